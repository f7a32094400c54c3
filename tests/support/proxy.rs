//! A loopback TCP proxy the tests can take down: while down it resets every open connection and
//! every new one, as an unreachable or failing endpoint does.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    down: bool,
    connections: Vec<JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut state = shared.lock().unwrap();
                if state.down {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                state.connections.push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Proxy {
            endpoint,
            state,
            accept,
        }
    }

    /// Resets every open connection and refuses new ones until `up`.
    pub fn down(&self) {
        let mut state = self.state.lock().unwrap();
        state.down = true;
        for connection in state.connections.drain(..) {
            connection.abort();
        }
    }

    pub fn up(&self) {
        self.state.lock().unwrap().down = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.down();
    }
}
