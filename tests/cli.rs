//! The `kinesis-producer put` command against the embedded Kinesis server.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::local_kinesis::LocalKinesis;

/// `kinesis-producer put` against `endpoint`, with `args`.
fn put_command(endpoint: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kinesis-producer"));
    command
        .arg("put")
        .args(["--endpoint-url", endpoint, "--region", "us-east-1"])
        .args(args);
    command
}

async fn run_put(endpoint: &str, args: &[&str], stdin: Vec<u8>) -> Output {
    run(put_command(endpoint, args), stdin).await
}

/// Test credentials, no profile, and every stream piped.
fn piped_with_test_credentials(command: &mut Command) {
    command
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env_remove("AWS_PROFILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
}

async fn run(mut command: Command, stdin: Vec<u8>) -> Output {
    piped_with_test_credentials(&mut command);
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
        r#"{"partition_key": "f", "data": "x", "data_base64": "eA=="}"#,
        r#"{"partition_key": "g"}"#,
        r#"{"partition_key": "h", "data_base64": "not base64!"}"#,
        r#"{"partition_key": "i", "data": "x", "colour": "red"}"#,
        r#"[1, 2]"#,
        r#"{"data": "no key"}"#,
        &format!(r#"{{"partition_key": "{}", "data": "x"}}"#, "k".repeat(257)),
        "",
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
    // Every malformed line is named by its number; the refused key too.
    for line in [3, 6, 7, 8, 9, 10, 11, 13] {
        let report = stderr
            .lines()
            .find(|l| l.contains(&format!(r#""line":{line},"#)))
            .unwrap_or_else(|| panic!("line {line} is reported: {stderr}"));
        assert!(report.contains("malformed input"), "{report}");
    }
    assert!(
        stderr.contains(r#""line":12"#) && stderr.contains("257 characters"),
        "{stderr}"
    );
    assert!(
        stderr.contains("records=3 ") && stderr.contains("malformed=8 refused=3"),
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

async fn run_cli(endpoint: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kinesis-producer"));
    command
        .args(args)
        .args(["--endpoint-url", endpoint, "--region", "us-east-1"]);
    run(command, Vec::new()).await
}

/// The JSON lines `tail` printed.
fn tail_lines(output: &Output) -> Vec<serde_json::Value> {
    assert!(output.status.success(), "{}", stderr_of(output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn data_of(line: &serde_json::Value) -> Vec<u8> {
    let data = line["data"].as_str().unwrap();
    match line["data_encoding"].as_str().unwrap() {
        "utf8" => data.as_bytes().to_vec(),
        _ => base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data).unwrap(),
    }
}

/// `put` input lines: text and binary records over 40 keys, numbered per key.
fn jsonl_batch(phase: usize, count: usize) -> (String, Vec<(String, Vec<u8>)>) {
    let mut input = String::new();
    let mut sent = Vec::new();
    for i in 0..count {
        let key = format!("key-{}", i % 40);
        let mut data = format!("{phase}:{i}:").into_bytes();
        if i % 3 == 0 {
            data.extend_from_slice(&[0xff, 0x00, 0xfe, (i % 256) as u8]); // not UTF-8
        }
        let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &data);
        input.push_str(&format!(
            "{{\"partition_key\":\"{key}\",\"data_base64\":\"{encoded}\"}}\n"
        ));
        sent.push((key, data));
    }
    (input, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_round_trips_what_put_wrote_across_a_reshard_including_binary_data() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-tail", 2).await;
    let put_args = ["--stream-name", "cli-tail", "--input", "jsonl"];
    let (input, mut sent) = jsonl_batch(0, 400);
    let output = run_put(&kinesis.endpoint, &put_args, input.into_bytes()).await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    // Split the first shard in two: its keys continue in its children.
    let parent = kinesis.open_shards("cli-tail").await[0].clone();
    kinesis
        .client
        .split_shard()
        .stream_name("cli-tail")
        .shard_to_split(&parent.0)
        .new_starting_hash_key((parent.1 / 2 + parent.2 / 2).to_string())
        .send()
        .await
        .expect("SplitShard");
    kinesis.wait_active("cli-tail").await;
    let (input, more) = jsonl_batch(1, 400);
    sent.extend(more);
    let output = run_put(&kinesis.endpoint, &put_args, input.into_bytes()).await;
    assert!(output.status.success(), "{}", stderr_of(&output));

    let lines = tail_lines(
        &run_cli(
            &kinesis.endpoint,
            &["tail", "--stream-name", "cli-tail", "--no-follow"],
        )
        .await,
    );
    let mut read: Vec<(String, Vec<u8>)> = lines
        .iter()
        .map(|l| (l["partition_key"].as_str().unwrap().to_owned(), data_of(l)))
        .collect();
    // Parents are read before their children: each key's records come out in put order.
    let mut last: std::collections::HashMap<String, (usize, usize)> = Default::default();
    for (key, data) in &read {
        let text = String::from_utf8_lossy(data);
        let mut parts = text.split(':');
        let phase: usize = parts.next().unwrap().parse().unwrap();
        let i: usize = parts.next().unwrap().parse().unwrap();
        if let Some(previous) = last.insert(key.clone(), (phase, i)) {
            assert!(
                (phase, i) > previous,
                "{key}: {phase}:{i} after {previous:?}"
            );
        }
    }
    let shards: std::collections::HashSet<&str> = lines
        .iter()
        .map(|l| l["shard_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        shards.len(),
        4,
        "the parent, its two children and the other shard"
    );
    assert!(lines
        .iter()
        .all(|l| l["sequence_number"].is_string() && l["sub_sequence_number"].is_u64()));
    assert!(lines.iter().any(|l| l["data_encoding"] == "base64"));
    assert!(lines.iter().any(|l| l["aggregated"] == true));
    read.sort();
    sent.sort();
    assert_eq!(read, sent, "every record, once, byte for byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_new_records_until_its_limit() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-follow", 2).await;
    let endpoint = kinesis.endpoint.clone();
    let tail = tokio::spawn(async move {
        run_cli(
            &endpoint,
            &[
                "tail",
                "--stream-name",
                "cli-follow",
                "--limit",
                "300",
                "--poll-interval-ms",
                "100",
            ],
        )
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let input: String = (0..300).map(|i| format!("followed {i}\n")).collect();
    let output = run_put(
        &kinesis.endpoint,
        &["--stream-name", "cli-follow"],
        input.into_bytes(),
    )
    .await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), tail)
        .await
        .expect("tail stops at its limit")
        .unwrap();
    let lines = tail_lines(&output);
    assert_eq!(lines.len(), 300);
}

/// An iterator that expires before `tail --from latest` printed anything is renewed at the time
/// the reader started, not at the start of the shard: records older than the tail stay unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_from_latest_renews_an_expired_iterator_without_reading_older_records() {
    use support::faults::{FaultProxy, Schedule};
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-expired", 1).await;
    let old: String = (0..20).map(|i| format!("old {i}\n")).collect();
    let output = run_put(
        &kinesis.endpoint,
        &["--stream-name", "cli-expired"],
        old.into_bytes(),
    )
    .await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let proxy = FaultProxy::start(&kinesis.endpoint, Schedule::new(31, 0.0, Vec::new())).await;
    let endpoint = proxy.endpoint.clone();
    let tail = tokio::spawn(async move {
        let args = ["tail", "--stream-name", "cli-expired", "--from", "latest"];
        // It reads once at the start, then waits 3 s at the tip.
        run_cli(
            &endpoint,
            &[&args[..], &["--limit", "5", "--poll-interval-ms", "3000"]].concat(),
        )
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    let new: String = (0..5).map(|i| format!("new {i}\n")).collect();
    let output = run_put(
        &kinesis.endpoint,
        &["--stream-name", "cli-expired"],
        new.into_bytes(),
    )
    .await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    // Its next read finds the iterator expired. (Renewed before the new records exist, the
    // embedded server would place an AT_TIMESTAMP iterator at the shard's start, not its tip.)
    proxy.expire_next_get_records();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), tail)
        .await
        .expect("tail stops at its limit")
        .unwrap();
    assert!(
        !proxy.expiry_pending(),
        "tail read through the expired iterator, not around it"
    );
    let printed: Vec<String> = tail_lines(&output)
        .iter()
        .map(|line| String::from_utf8(data_of(line)).unwrap())
        .collect();
    assert!(printed.iter().all(|d| d.starts_with("new ")), "{printed:?}");
    assert_eq!(printed.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_reads_one_shard_from_a_sequence_number_and_refuses_bad_positions() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-at", 2).await;
    let input: String = (0..200).map(|i| format!("at {i}\n")).collect();
    let output = run_put(
        &kinesis.endpoint,
        &["--stream-name", "cli-at", "--no-aggregation"],
        input.into_bytes(),
    )
    .await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    let raw = kinesis.read_raw("cli-at").await;
    let shard = raw[0].shard_id.clone();
    let in_shard: Vec<_> = raw.iter().filter(|r| r.shard_id == shard).collect();
    let from = &in_shard[5];
    let lines = tail_lines(
        &run_cli(
            &kinesis.endpoint,
            &[
                "tail",
                "--stream-name",
                "cli-at",
                "--shard",
                &shard,
                "--from",
                "at-sequence",
                &from.sequence_number,
                "--no-follow",
            ],
        )
        .await,
    );
    assert_eq!(lines.len(), in_shard.len() - 5);
    assert_eq!(lines[0]["sequence_number"], from.sequence_number.as_str());
    assert!(lines.iter().all(|l| l["shard_id"] == shard.as_str()));

    for (args, expected) in [
        (vec!["--from", "at-sequence", "1"], "needs --shard"),
        (vec!["--from", "yesterday"], "expected trim-horizon"),
        (vec!["--from", "at-timestamp", "noon"], "RFC 3339"),
        (vec!["--shard", "shardId-999"], "no shard shardId-999"),
    ] {
        let mut all = vec!["tail", "--stream-name", "cli-at", "--no-follow"];
        all.extend(args);
        let output = run_cli(&kinesis.endpoint, &all).await;
        assert_eq!(output.status.code(), Some(2));
        assert!(
            stderr_of(&output).contains(expected),
            "{}",
            stderr_of(&output)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_shows_progress_only_on_a_terminal_and_prints_metrics_on_request() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-progress", 1).await;
    // Not a terminal (a pipe): no progress line, and the metrics as JSON on stdout.
    let input: String = (0..1_000).map(|i| format!("line {i}\n")).collect();
    let output = run_put(
        &kinesis.endpoint,
        &["--stream-name", "cli-progress", "--metrics"],
        input.clone().into_bytes(),
    )
    .await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(!stderr_of(&output).contains("records/s"));
    let metrics: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let put = metrics["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "UserRecordsPut" && m["dimensions"].as_object().unwrap().is_empty())
        .expect("UserRecordsPut");
    assert_eq!(put["sum"], 1_000.0);
    assert_eq!(put["unit"], "Count");

    // A terminal: `script` runs the command under a pseudo-terminal.
    let file = std::env::temp_dir().join(format!("kp-progress-{}.txt", std::process::id()));
    std::fs::write(&file, &input).unwrap();
    let command_line = format!(
        "{} put --stream-name cli-progress --endpoint-url {} --region us-east-1 < {}",
        env!("CARGO_BIN_EXE_kinesis-producer"),
        kinesis.endpoint,
        file.display()
    );
    let mut command = Command::new("script");
    command.args(["-qec", &command_line, "/dev/null"]);
    let output = run(command, Vec::new()).await;
    let _ = std::fs::remove_file(&file);
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{screen}");
    assert!(screen.contains("records/s"), "{screen}");
    assert!(screen.contains("records=1000 "), "{screen}");
}

#[cfg(target_os = "linux")]
/// `key=value` lines as a map.
fn figures(stdout: &[u8]) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(target_os = "linux")]
fn number(figures: &std::collections::HashMap<String, String>, key: &str) -> f64 {
    figures
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {figures:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number: {figures:?}"))
}

#[cfg(target_os = "linux")]
async fn run_perf(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kinesis-producer"));
    command.arg("perf").args(args);
    run(command, Vec::new()).await
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_against_the_null_sink_prints_every_figure_and_the_floor() {
    for (keys, aggregation) in [
        ("random", true),
        ("ehk", true),
        ("fixed", true),
        ("random", false),
    ] {
        let mut args = vec![
            "--null-sink",
            "--records",
            "20000",
            "--record-size",
            "100",
            "--shards",
            "4",
            "--keys",
            keys,
            "--threads",
            "2",
        ];
        if !aggregation {
            args.push("--no-aggregation");
        }
        // One case gives every record a buffer of its own.
        let owned = keys == "fixed";
        if owned {
            args.push("--owned-data");
        }
        let output = run_perf(&args).await;
        assert!(output.status.success(), "{keys}: {}", stderr_of(&output));
        let f = figures(&output.stdout);
        let case = format!("keys {keys}, aggregation {aggregation}: {f:?}");
        for key in [
            "records",
            "bytes",
            "wall_seconds",
            "cpu_seconds",
            "cpu_ns_per_record",
            "records_per_second",
            "mb_per_second",
            "user_records_per_kinesis_record",
            "user_records_per_request",
            "peak_rss_bytes",
            "latency_p50_ms",
            "latency_p99_ms",
            "latency_max_ms",
            "floor_ns_per_record",
            "efficiency",
        ] {
            assert!(number(&f, key) > 0.0, "{key} in {case}");
        }
        assert_eq!(number(&f, "acknowledged"), 20_000.0, "{case}");
        assert_eq!(
            f.get("owned_data").map(String::as_str),
            Some(if owned { "true" } else { "false" }),
            "{case}"
        );
        // The printed figures agree: the producer's CPU is the process's less perf's own work,
        // the sink's and the recorder's (rounded to the millisecond, the recorder's to the
        // microsecond).
        let own = number(&f, "sink_cpu_seconds") + number(&f, "recorder_cpu_seconds");
        let producer = number(&f, "process_cpu_seconds") - own;
        assert!(number(&f, "recorder_cpu_seconds") > 0.0, "{case}");
        assert!(
            (number(&f, "cpu_seconds") - producer).abs() <= 0.002,
            "{case}"
        );
        assert_eq!(number(&f, "failed"), 0.0, "{case}");
        assert_eq!(number(&f, "bytes"), 2_000_000.0, "{case}");
        assert_eq!(number(&f, "shards"), 4.0, "{case}");
        // Every Kinesis record the producer counts reached the sink, on the shard it predicted
        // (a wrong ShardId in an answer would make it re-send, and count more).
        assert_eq!(
            number(&f, "sink_entries"),
            number(&f, "kinesis_records"),
            "{case}"
        );
        assert_eq!(
            number(&f, "sink_put_records_requests"),
            number(&f, "requests"),
            "{case}"
        );
        // Every 1,000th record (the default) is timed through a receipt: ten in each thread's
        // share.
        assert_eq!(number(&f, "latency_samples"), 20.0, "{case}");
        assert!(
            number(&f, "latency_p50_ms") <= number(&f, "latency_p99_ms"),
            "{case}"
        );
        // The floor's parts add up, and each is there exactly when it applies.
        let parts: f64 = [
            "floor_md5_aggregates_ns_per_record",
            "floor_md5_keys_ns_per_record",
            "floor_sha256_bodies_ns_per_record",
            "floor_base64_ns_per_record",
        ]
        .iter()
        .map(|k| number(&f, k))
        .sum();
        assert!(
            (parts - number(&f, "floor_ns_per_record")).abs() <= 4.0,
            "{case}"
        );
        // And what is beyond it is the rest of the CPU (each figure rounded on its own).
        let beyond = number(&f, "cpu_ns_per_record") - number(&f, "floor_ns_per_record");
        assert!(
            (number(&f, "beyond_floor_ns_per_record") - beyond).abs() <= 1.0,
            "{case}"
        );
        assert!(
            number(&f, "floor_sha256_bodies_ns_per_record") > 0.0,
            "{case}"
        );
        let per_kinesis = number(&f, "user_records_per_kinesis_record");
        if aggregation {
            assert!(per_kinesis > 1.0, "{case}");
            assert!(
                number(&f, "floor_md5_aggregates_ns_per_record") > 0.0,
                "{case}"
            );
        } else {
            assert_eq!(per_kinesis, 1.0, "{case}");
            assert_eq!(
                number(&f, "floor_md5_aggregates_ns_per_record"),
                0.0,
                "{case}"
            );
        }
        let md5_keys = number(&f, "floor_md5_keys_ns_per_record");
        match (keys, aggregation) {
            ("random", true) => assert!(md5_keys > 0.0, "{case}"),
            // One key, hashed once for the whole run: a few nanoseconds at most over 20,000
            // records, however the clock rounds.
            ("fixed", true) => assert!(md5_keys <= 5.0, "{case}"),
            // Explicit hash keys, or no aggregation: Kinesis routes, nothing to hash.
            _ => assert_eq!(md5_keys, 0.0, "{case}"),
        }
    }
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_caps_the_aggregation_density_and_measures_without_metrics_on_request() {
    // One shard and 100-byte records: uncapped, aggregates hold hundreds of records.
    let output = run_perf(&[
        "--null-sink",
        "--records",
        "6000",
        "--aggregation-max-count",
        "6",
        "--metrics-level",
        "none",
        "--metrics-granularity",
        "global",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    let f = figures(&output.stdout);
    assert_eq!(number(&f, "acknowledged"), 6000.0, "{f:?}");
    assert_eq!(number(&f, "sink_entries"), number(&f, "kinesis_records"));
    // At most six per aggregate; a deadline may close one early, but 6,000 records in
    // well under a second leave nearly all of them full.
    let per_kinesis = number(&f, "user_records_per_kinesis_record");
    assert!(per_kinesis <= 6.0 && per_kinesis > 5.0, "{f:?}");
    assert!(number(&f, "kinesis_records") >= 1000.0, "{f:?}");
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_caps_the_request_size_on_request() {
    // 6,000 KiB of data: with requests of at most 1 MiB, at least six of them.
    let output = run_perf(&[
        "--null-sink",
        "--records",
        "6000",
        "--record-size",
        "1024",
        "--shards",
        "2",
        "--collection-max-size",
        "1048576",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    let f = figures(&output.stdout);
    assert_eq!(number(&f, "acknowledged"), 6000.0, "{f:?}");
    assert!(number(&f, "requests") >= 6.0, "{f:?}");
    assert_eq!(
        number(&f, "sink_put_records_requests"),
        number(&f, "requests")
    );
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_delays_the_sinks_answers_and_measures_order_mode_on_request() {
    // Answers held 200 ms, aggregates closed every 20 ms: in order mode several close while
    // their shard's record is out, and are joined before they leave.
    let output = run_perf(&[
        "--null-sink",
        "--records",
        "4000",
        "--shards",
        "2",
        "--rate",
        "8000",
        "--sink-delay-ms",
        "200",
        "--preserve-order",
        "--record-max-buffered-time-ms",
        "20",
        "--aggregation-max-size",
        "20000",
        "--latency-every",
        "1",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    let f = figures(&output.stdout);
    assert_eq!(number(&f, "acknowledged"), 4000.0, "{f:?}");
    assert_eq!(f.get("preserve_order").map(String::as_str), Some("true"));
    assert_eq!(number(&f, "sink_delay_ms"), 200.0, "{f:?}");
    // The median acknowledgement waits at least the answer's delay.
    assert!(number(&f, "latency_p50_ms") >= 200.0, "{f:?}");
    assert!(number(&f, "kinesis_records_joined") > 0.0, "{f:?}");
    assert_eq!(
        number(&f, "sink_put_records_requests"),
        number(&f, "requests")
    );
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_under_a_stalled_sink_ends_every_record_acknowledged_or_failed() {
    let output = run_perf(&[
        "--null-sink",
        "--records",
        "3000",
        "--shards",
        "2",
        "--sink-stall-after",
        "1",
        // Two records per Kinesis record: at least three requests however fast the puts are
        // (a fast build once put all 3,000 records within one 20 ms window, and so one request).
        "--aggregation-max-count",
        "2",
        "--record-max-buffered-time-ms",
        "20",
        "--record-ttl-ms",
        "1500",
        "--request-timeout-ms",
        "300",
    ])
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    let f = figures(&output.stdout);
    let (acknowledged, failed) = (number(&f, "acknowledged"), number(&f, "failed"));
    assert!(failed > 0.0, "{f:?}");
    assert_eq!(acknowledged + failed, 3000.0, "{f:?}");
    assert!(number(&f, "sink_stalled_requests") >= 1.0, "{f:?}");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn perf_refuses_bad_arguments_with_a_clear_error() {
    let output = run_perf(&["--null-sink", "--records", "0"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("--records, --threads and --shards must be at least 1"));
    let output = run_perf(&["--null-sink", "--rate", "0"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("--rate must be a positive number"));
    let output = run_perf(&["--null-sink", "--aggregation-max-count", "0"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr_of(&output).contains("aggregation_max_count = 0"),
        "{}",
        stderr_of(&output)
    );
    let output = run_perf(&["--null-sink", "--collection-max-size", "1000"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr_of(&output).contains("collection_max_size = 1000"),
        "{}",
        stderr_of(&output)
    );
    for (args, message) in [
        (
            ["--record-size", "18446744073709551615"],
            "--record-size must be at most",
        ),
        (
            ["--record-size", "20000000"],
            "--record-size must be at most",
        ),
        (["--shards", "10000000000"], "--shards must be at most"),
    ] {
        let output = run_perf(&[&["--null-sink"][..], &args[..]].concat()).await;
        assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
        assert!(
            stderr_of(&output).contains(message),
            "{}",
            stderr_of(&output)
        );
    }
    let output = run_perf(&["--records", "10"]).await;
    assert!(!output.status.success());
    assert!(
        stderr_of(&output).contains("--null-sink"),
        "{}",
        stderr_of(&output)
    );
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_sink_serves_a_producer_in_another_process_and_refuses_malformed_bodies() {
    use std::io::{BufRead, BufReader, Read};

    let mut sink = std::process::Command::new(env!("CARGO_BIN_EXE_kinesis-producer"))
        .args(["perf-sink", "--shards", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("perf-sink starts");
    let mut sink_out = BufReader::new(sink.stdout.take().unwrap());
    let mut first = String::new();
    sink_out.read_line(&mut first).unwrap();
    let endpoint = first
        .trim()
        .strip_prefix("endpoint=")
        .expect(&first)
        .to_owned();

    let mut command = Command::new(env!("CARGO_BIN_EXE_kinesis-producer"));
    command
        .args(["perf", "--endpoint-url", &endpoint, "--region", "us-east-1"])
        .args(["--records", "5000", "--keys", "ehk"]);
    let output = run(command, Vec::new()).await;
    assert!(output.status.success(), "{}", stderr_of(&output));
    let f = figures(&output.stdout);
    assert_eq!(number(&f, "acknowledged"), 5000.0);
    assert_eq!(
        number(&f, "shards"),
        3.0,
        "the map came from the sink's ListShards"
    );

    // A body that is not PutRecords JSON gets a 400 naming the problem.
    let address = endpoint.trim_start_matches("http://");
    let mut raw = std::net::TcpStream::connect(address).unwrap();
    let body = r#"{"Records":[{"Data":"AA=="}]}"#;
    write!(
        raw,
        "POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: Kinesis_20131202.PutRecords\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("an entry has no PartitionKey"), "{answer}");
    // A body cut short (its Content-Length says it all arrived) is refused, not waited on.
    let mut raw = std::net::TcpStream::connect(address).unwrap();
    let body = r#"{"Records":[{"PartitionKey":"k""#;
    write!(
        raw,
        "POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: Kinesis_20131202.PutRecords\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    raw.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("the PutRecords body ended early"),
        "{answer}"
    );

    // SIGTERM: the sink prints what it served and exits.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc_kill(sink.id() as i32, 15) }, 0);
    let mut rest = String::new();
    sink_out.read_to_string(&mut rest).unwrap();
    assert!(sink.wait().unwrap().success());
    let served = figures(rest.as_bytes());
    assert_eq!(
        number(&served, "entries"),
        number(&f, "kinesis_records"),
        "{rest}"
    );
    assert_eq!(
        number(&served, "put_records_requests"),
        number(&f, "requests") + 2.0,
        "{rest}"
    );
}

#[cfg(target_os = "linux")]
extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

/// Reads `key=value` figures from the summary line `put` ends with.
fn summary_figures(stderr: &str) -> std::collections::HashMap<String, u64> {
    let summary = stderr
        .lines()
        .rfind(|l| l.starts_with("records="))
        .unwrap_or_else(|| panic!("no summary line in: {stderr}"));
    summary
        .split(' ')
        .filter_map(|pair| pair.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// `put` on an input that never ends, stopped by SIGTERM (a supervisor, or Ctrl-C's SIGINT):
/// everything already read is sent before it exits, and the summary accounts for every line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_stopped_by_a_signal_sends_what_it_read_and_accounts_for_every_line() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-signal", 2).await;
    let mut command = put_command(
        &kinesis.endpoint,
        // Still buffered when the signal comes.
        &[
            "--stream-name",
            "cli-signal",
            "--record-max-buffered-time-ms",
            "20000",
        ],
    );
    piped_with_test_credentials(&mut command);
    let output = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("the binary runs");
        let mut stdin = child.stdin.take().unwrap();
        let input: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        stdin.write_all(input.as_bytes()).unwrap();
        // The input stays open, as `tail -f` keeps it.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        let output = child.wait_with_output().unwrap();
        drop(stdin);
        output
    })
    .await
    .unwrap();
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(r#""signal":"SIGTERM""#), "{stderr}");
    let figures = summary_figures(&stderr);
    assert_eq!(figures["lines"], 10_000, "{stderr}");
    assert_eq!(figures["records"], 10_000, "{stderr}");
    assert_eq!(figures["failures"] + figures["refused"], 0, "{stderr}");
    assert_eq!(kinesis.read_all("cli-signal").await.len(), 10_000);
}

/// A line longer than any record can be is skipped as it is read (never held whole) and
/// reported by number; the lines after it go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_skips_a_line_longer_than_any_record_and_goes_on() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("cli-long", 1).await;
    let mut input = vec![b'a'; 15 << 20];
    input.extend_from_slice(b"\nshort\n");
    let output = run_put(&kinesis.endpoint, &["--stream-name", "cli-long"], input).await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(r#""line":1"#) && stderr.contains("longer than"),
        "{stderr}"
    );
    let figures = summary_figures(&stderr);
    assert_eq!(figures["records"], 1, "{stderr}");
    assert_eq!(figures["refused"], 1, "{stderr}");
    let read = kinesis.read_all("cli-long").await;
    assert_eq!(read.len(), 1);
    assert_eq!(&read[0].record.data[..], b"short");
}
