//! moto (PyPI `moto[server]`), a local server for SQS, DynamoDB, S3, Firehose and Kinesis, on
//! 127.0.0.1. One server per process (a test binary, or the scatter-gather example), started on
//! first use; each test (or run) takes the lock, which resets the server's state
//! (`POST /moto-api/reset`) so runs don't see each other's data.
//!
//! moto speaks CloudWatch only in JSON 1.0, and the Rust client only in CBOR (Smithy RPC v2):
//! `tests/batch/cbor_shim.py` translates, and [`Moto::cloudwatch_endpoint`] is that shim.
//!
//! Set `KP_MOTO_LOG` to a file to keep the servers' logs (moto prints its tracebacks there).
//!
//! Both come from the venv (`.venv/bin`, or the one in `KP_VENV`), which `scripts/test.sh`
//! installs from `tests/batch/requirements.txt`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, MutexGuard};

use super::ports::start_on_free_ports;

static ENDPOINTS: OnceLock<(String, String)> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::const_new(());

/// The server, reset, held for one test.
pub struct Moto {
    pub endpoint: String,
    /// The CBOR shim in front of moto, for the CloudWatch client.
    pub cloudwatch_endpoint: String,
    _turn: MutexGuard<'static, ()>,
}

/// Starts the server once, then waits for this test's turn and resets it.
pub async fn moto() -> Moto {
    let turn = LOCK.lock().await;
    let (endpoint, cloudwatch_endpoint) = ENDPOINTS.get_or_init(start).clone();
    let (status, _) = http(&endpoint, "POST", "/moto-api/reset", "").await;
    assert_eq!(status, 200, "moto reset");
    Moto {
        endpoint,
        cloudwatch_endpoint,
        _turn: turn,
    }
}

fn start() -> (String, String) {
    let venv = std::env::var_os("KP_VENV").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv"),
        PathBuf::from,
    );
    let server = venv.join("bin/moto_server");
    assert!(
        server.exists(),
        "{} is missing: run scripts/test.sh, which installs moto",
        server.display()
    );
    let moto_port = start_on_free_port(&server, |port| {
        vec![
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ]
    });
    let endpoint = format!("http://127.0.0.1:{moto_port}");
    let shim = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/batch/cbor_shim.py");
    let python = venv.join("bin/python");
    let shim_port = start_on_free_port(&python, |port| {
        vec![
            shim.to_str().expect("path").to_owned(),
            port.to_string(),
            endpoint.clone(),
        ]
    });
    (endpoint, format!("http://127.0.0.1:{shim_port}"))
}

/// Starts `program` (under its watchdog) with the arguments `args` gives for a picked port.
fn start_on_free_port(program: &Path, args: impl Fn(u16) -> Vec<String>) -> u16 {
    let name = program.display().to_string();
    let ([port], mut watchdog) =
        start_on_free_ports(&name, |[port]| spawn_watched(program, &args(port)));
    // Reaped by a thread of its own, should it end while the tests run.
    std::thread::spawn(move || watchdog.wait());
    port
}

/// Runs `program` under a watchdog shell that ends it once the test process (the shell's
/// parent) is gone: a test binary never drops its statics.
/// The watchdog exits when `program` does.
fn spawn_watched(program: &Path, args: &[String]) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(r#"parent=$PPID; "$@" & child=$!; while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done; kill "$child" 2>/dev/null"#)
        .arg("watchdog")
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(server_log())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()))
}

/// Where the servers' own logs go: the file named by `KP_MOTO_LOG` (appended), else nowhere.
fn server_log() -> Stdio {
    let file = std::env::var_os("KP_MOTO_LOG").and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    file.map_or_else(Stdio::null, Stdio::from)
}

/// A plain HTTP/1.1 request (Connection: close); the status and body.
pub async fn http(endpoint: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let address = endpoint.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to moto");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    // A listener that never answers (not moto: something else took its port) fails the test
    // rather than hang it.
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("no answer from {endpoint} within 60 s"))
        .expect("read");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The SDK configuration for a local endpoint: static test credentials, us-east-1.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "AKIDTEST", "secret", None, None, "test",
        ))
        .load()
        .await
}
