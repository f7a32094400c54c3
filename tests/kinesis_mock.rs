//! A reshard against a second, independent server: kinesis-local (kinesis-mock, npm), whose
//! UpdateShardCount has a real UPDATING phase. It answers about one request a second, so the
//! volume is modest and aggregation stays on. `./scripts/test.sh` installs it (npm ci in
//! tests/interop); this test starts it on 127.0.0.1 and stops it.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_sdk_kinesis::types::ScalingType;
use kinesis_producer::{Producer, ProducerBuilder};
use support::local_kinesis::{count_by_index, open_shards, read_as_kcl, wait_active};
use support::ports::start_on_free_ports;

/// The kinesis-local process; killed on drop.
struct KinesisMock {
    child: Child,
    endpoint: String,
}

impl Drop for KinesisMock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts kinesis-local on loopback. Its bundle binds 0.0.0.0 with no setting to change it, so
/// it runs from a copy with that one address replaced by 127.0.0.1.
async fn start_kinesis_mock() -> KinesisMock {
    let package =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/node_modules/kinesis-local");
    let bundle = std::fs::read_to_string(package.join("main.js")).unwrap_or_else(|e| {
        panic!("kinesis-local is not installed ({e}); ./scripts/test.sh installs it (npm ci in tests/interop)")
    });
    let loopback = bundle.replace("em(\"0.0.0.0\")", "em(\"127.0.0.1\")");
    assert_ne!(loopback, bundle, "the bind address was found and replaced");
    let script =
        std::env::temp_dir().join(format!("kinesis-local-loopback-{}.js", std::process::id()));
    std::fs::write(&script, loopback).unwrap();
    let ([plain, _tls], child) = start_on_free_ports("kinesis-local", |[plain, tls]| {
        Command::new("node")
            .arg(&script)
            .env("KINESIS_MOCK_CERT_PATH", package.join("server.json"))
            .env("KINESIS_MOCK_PLAIN_PORT", plain.to_string())
            .env("KINESIS_MOCK_TLS_PORT", tls.to_string())
            .env("SHARD_LIMIT", "100")
            .env("CREATE_STREAM_DURATION", "0ms")
            .env("UPDATE_SHARD_COUNT_DURATION", "2s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node runs")
    });
    KinesisMock {
        child,
        endpoint: format!("http://127.0.0.1:{plain}"),
    }
}

/// Settings for a server this slow. It answers about one request a second, slower while it
/// reshards: a request that timed out after it was written would be sent again, a duplicate
/// the tests' checks do not allow. Nothing here needs a short timeout.
fn patient(builder: ProducerBuilder, client: &aws_sdk_kinesis::Client) -> ProducerBuilder {
    builder
        .client(client.clone())
        .record_max_buffered_time(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(60))
        .record_ttl(Duration::from_secs(300))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_on_kinesis_mock_loses_nothing() {
    const RECORDS: usize = 3_000;
    let mock = start_kinesis_mock().await;
    let client = support::local_kinesis::client_for(&mock.endpoint);
    client
        .create_stream()
        .stream_name("mock")
        .shard_count(2)
        .send()
        .await
        .expect("CreateStream");
    wait_active(&client, "mock").await;
    let producer = patient(Producer::builder().stream_name("mock"), &client)
        .build()
        .await
        .expect("builds");
    let mut failures = producer.notify_failures();
    for i in 0..RECORDS / 2 {
        producer
            .put(format!("{i:06}"), format!("key-{i}"))
            .await
            .unwrap();
    }
    producer.flush().await;
    client
        .update_shard_count()
        .stream_name("mock")
        .target_shard_count(4)
        .scaling_type(ScalingType::UniformScaling)
        .send()
        .await
        .expect("UpdateShardCount");
    // Puts go on while the stream is UPDATING.
    for i in RECORDS / 2..RECORDS {
        producer
            .put(format!("{i:06}"), format!("key-{i}"))
            .await
            .unwrap();
    }
    wait_active(&client, "mock").await;
    producer.stop().await;
    assert!(failures.recv().await.is_none(), "nothing failed");
    assert_eq!(producer.stats().user_records_put, RECORDS as u64);

    // Read every shard back as the KCL would, and find every record.
    let (delivered, _) = read_as_kcl(&client, "mock").await;
    let seen = count_by_index(&delivered, RECORDS);
    let missing: Vec<_> = (0..RECORDS).filter(|i| seen[*i] == 0).collect();
    assert!(
        missing.is_empty(),
        "{} records missing, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let duplicates: u64 = seen.iter().map(|n| u64::from(n.saturating_sub(1))).sum();
    assert!(duplicates <= producer.stats().records_resent_after_reshard);
    let open = open_shards(&client, "mock").await;
    assert_eq!(open.len(), 4, "the stream was resharded");
    // The producer noticed: its map is the stream's four open shards.
    let mut mapped: Vec<String> = producer
        .shard_map()
        .shards()
        .iter()
        .map(|s| s.shard_id.to_string())
        .collect();
    let mut open_ids: Vec<String> = open.into_iter().map(|(id, _, _)| id).collect();
    mapped.sort();
    open_ids.sort();
    assert_eq!(mapped, open_ids, "the producer's map follows the reshard");
    println!(
        "kinesis-mock: {:?}, map now {} shards",
        producer.stats(),
        producer.shard_map().len()
    );
}

/// A producer configured with the stream's ARN alone: DescribeStreamSummary, ListShards and
/// PutRecords all name the stream by `StreamARN`, and every record lands. (The embedded server
/// ignores `StreamARN` in ListShards, so this runs on kinesis-mock, which implements it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_given_only_the_stream_arn_delivers_every_record() {
    const RECORDS: usize = 400;
    let mock = start_kinesis_mock().await;
    let client = support::local_kinesis::client_for(&mock.endpoint);
    for name in ["by-arn", "decoy"] {
        client
            .create_stream()
            .stream_name(name)
            .shard_count(2)
            .send()
            .await
            .expect("CreateStream");
        wait_active(&client, name).await;
    }
    let summary = client
        .describe_stream_summary()
        .stream_name("by-arn")
        .send()
        .await
        .expect("DescribeStreamSummary");
    let arn = summary
        .stream_description_summary()
        .expect("a summary")
        .stream_arn()
        .to_owned();
    let producer = patient(Producer::builder().stream_arn(arn), &client)
        .build()
        .await
        .expect("builds from the ARN alone");
    assert_eq!(producer.shard_map().len(), 2, "ListShards by ARN");
    let mut failures = producer.notify_failures();
    for i in 0..RECORDS {
        producer
            .put(format!("{i:06}"), format!("key-{i}"))
            .await
            .unwrap();
    }
    producer.stop().await;
    assert!(failures.recv().await.is_none(), "nothing failed");
    assert_eq!(producer.stats().user_records_put, RECORDS as u64);
    let (delivered, _) = read_as_kcl(&client, "by-arn").await;
    let seen = count_by_index(&delivered, RECORDS);
    assert!(seen.iter().all(|n| *n == 1), "each record once: {seen:?}");
    let (decoy, _) = read_as_kcl(&client, "decoy").await;
    assert!(decoy.is_empty(), "nothing went to the other stream");
}

/// The support code every local server starts through: a server that exits before it listens
/// (as one does when its port was taken between the pick and its bind) is started again on
/// other ports, and the one that listens is returned.
#[test]
fn a_server_that_exits_before_listening_is_started_again() {
    let mut attempts = 0;
    let ([port], mut server) = start_on_free_ports("a test server", |[port]| {
        attempts += 1;
        let script = if attempts == 1 {
            "import sys; sys.exit(3)".to_string()
        } else {
            format!(
                "import socket, time; s = socket.socket(); \
                 s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"
            )
        };
        Command::new("python3")
            .args(["-c", &script])
            .spawn()
            .expect("python3 runs")
    });
    assert_eq!(attempts, 2, "started once more after the first exited");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let _ = server.kill();
    let _ = server.wait();
}
