//! The `kinesis-producer put` command against the embedded Kinesis server.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::local_kinesis::LocalKinesis;

async fn run_put(endpoint: &str, args: &[&str], stdin: Vec<u8>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kinesis-producer"));
    command
        .arg("put")
        .args(["--endpoint-url", endpoint, "--region", "us-east-1"])
        .args(args);
    run(command, stdin).await
}

async fn run(mut command: Command, stdin: Vec<u8>) -> Output {
    command
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env_remove("AWS_PROFILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("the binary runs");
        child.stdin.take().unwrap().write_all(&stdin).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_ships_every_line_and_exits_zero() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-lines", 2).await;
    let input: String = (0..5_000).map(|i| format!("line number {i}\n")).collect();
    let output = run_put(
        &kinesis.endpoint,
        &["--stream-name", "cli-lines"],
        input.into_bytes(),
    )
    .await;
    let stderr = stderr_of(&output);
    assert!(output.status.success(), "{stderr}");
    let summary = stderr.lines().last().unwrap();
    assert!(summary.starts_with("records=5000 "), "{summary}");
    assert!(summary.contains("failures=0"), "{summary}");
    let read = kinesis.read_all("cli-lines").await;
    assert_eq!(read.len(), 5_000);
    let mut lines: Vec<_> = read
        .iter()
        .map(|r| String::from_utf8(r.record.data.to_vec()).unwrap())
        .collect();
    lines.sort();
    let mut expected: Vec<_> = (0..5_000).map(|i| format!("line number {i}")).collect();
    expected.sort();
    assert_eq!(lines, expected, "data is the line without its newline");
    // Keys are random UUIDs unless one is given.
    assert!(read.iter().all(|r| r.record.partition_key.len() == 36));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_input_reports_malformed_lines_by_number_and_exits_non_zero() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-jsonl", 1).await;
    let input = [
        r#"{"partition_key": "a", "data": "plain text"}"#,
        r#"{"partition_key": "b", "data_base64": "AAEC/w==", "explicit_hash_key": "12345"}"#,
        r#"{"partition_key": "c", "data": "#,
        r#"{"partition_key": "", "data": "empty key"}"#,
        r#"{"partition_key": "d", "data": "x", "explicit_hash_key": "-1"}"#,
        r#"{"partition_key": "e", "data": "last"}"#,
    ]
    .join("\n");
    let output = run_put(
        &kinesis.endpoint,
        &[
            "--stream-name",
            "cli-jsonl",
            "--input",
            "jsonl",
            "--no-aggregation",
        ],
        input.into_bytes(),
    )
    .await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(r#""line":3"#) && stderr.contains("malformed input"),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#""line":4"#) && stderr.contains("partition key is empty"),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#""line":5"#) && stderr.contains("explicit hash key"),
        "{stderr}"
    );
    assert!(
        stderr.contains("records=3 ") && stderr.contains("malformed=1 refused=2"),
        "{stderr}"
    );
    let read = kinesis.read_all("cli-jsonl").await;
    let mut got: Vec<_> = read
        .iter()
        .map(|r| (r.record.partition_key.clone(), r.record.data.to_vec()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("a".to_owned(), b"plain text".to_vec()),
            ("b".to_owned(), vec![0, 1, 2, 255]),
            ("e".to_owned(), b"last".to_vec()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_fail_are_printed_as_json_and_the_exit_code_says_so() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-fail", 1).await;
    // 200 two-byte characters: this server refuses the key (it counts bytes), so the record
    // fails with the server's error, alone.
    let bad_key = "é".repeat(200);
    let output = run_put(
        &kinesis.endpoint,
        &["--stream-name", "cli-fail", "--partition-key", &bad_key],
        b"doomed\n".to_vec(),
    )
    .await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let failure = stderr
        .lines()
        .find(|l| l.contains(r#""error":"failed""#))
        .expect("a JSON line for the failed record");
    let parsed: serde_json::Value = serde_json::from_str(failure).unwrap();
    assert_eq!(parsed["code"], "ValidationException");
    assert_eq!(parsed["partition_key"], bad_key.as_str());
    assert!(stderr.contains("failures=1"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_and_region_can_come_from_the_environment() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-env", 1).await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_kinesis-producer"));
    command
        .args(["put", "--stream-name", "cli-env", "--partition-key", "k"])
        .env("AWS_ENDPOINT_URL", &kinesis.endpoint)
        .env("AWS_REGION", "us-east-1");
    let output = run(command, b"one\ntwo\r\n".to_vec()).await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    let mut data: Vec<_> = kinesis
        .read_all("cli-env")
        .await
        .into_iter()
        .map(|r| r.record.data.to_vec())
        .collect();
    data.sort();
    assert_eq!(
        data,
        vec![b"one".to_vec(), b"two".to_vec()],
        "CRLF is a line ending too"
    );
}

#[tokio::test]
async fn an_unknown_stream_is_a_clear_error() {
    let kinesis = LocalKinesis::start(false).await;
    let output = run_put(
        &kinesis.endpoint,
        &["--stream-name", "nope"],
        b"x\n".to_vec(),
    )
    .await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ResourceNotFound"), "{stderr}");
}
