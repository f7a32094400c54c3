//! Local servers started on ports picked for them. A port free a moment ago can be taken before
//! the server binds it (a connection's local port, another server): the server then exits at
//! once, and is started again on other ports.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

/// Starts a server with `spawn` on `N` ports that were free a moment ago, and waits until it
/// listens on the first; up to five times. `what` names the server in the panic.
pub fn start_on_free_ports<const N: usize>(
    what: &str,
    mut spawn: impl FnMut([u16; N]) -> Child,
) -> ([u16; N], Child) {
    for _ in 0..5 {
        let ports = [(); N].map(|()| free_port());
        let mut server = spawn(ports);
        if wait_for(ports[0], &mut server) {
            return (ports, server);
        }
        // Already reaped by `try_wait`; this only satisfies the zombie check.
        let _ = server.wait();
    }
    panic!("{what} did not start on any of five sets of ports");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until something listens on `port`: `false` if `server` exited first.
fn wait_for(port: u16, server: &mut Child) -> bool {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if matches!(server.try_wait(), Ok(Some(_))) {
            return false;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing listens on port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}
