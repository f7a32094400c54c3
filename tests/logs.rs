//! Logs never carry record data or credentials, even at TRACE level with every crate's events
//! (the AWS SDK's included) captured, and the producer's own events never carry partition keys. A separate test binary: the subscriber is
//! global, so that the runtime's worker threads report to it too.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use base64::Engine;
use kinesis_producer::{Producer, UserRecord};
use support::local_kinesis::LocalKinesis;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_record_data_keys_or_credentials() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    const DATA: &str = "planted-record-data-7f3a";
    const KEY: &str = "planted-partition-key-91c2";
    const SECRET: &str = "planted-secret-access-key-0d5e";
    const ACCESS: &str = "AKIAPLANTED0000000042";
    const TOKEN: &str = "planted-session-token-6b1f";
    let kinesis = LocalKinesis::start(true).await; // throttles, so retries are logged too
    kinesis.create_stream("logs", 1).await;
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&kinesis.endpoint)
        .credentials_provider(Credentials::new(
            ACCESS,
            SECRET,
            Some(TOKEN.into()),
            None,
            "test",
        ))
        .build();
    let producer = Producer::builder()
        .stream_name("logs")
        .client(aws_sdk_kinesis::Client::from_conf(config))
        .aggregation(false)
        .rate_limit(400)
        .build()
        .await
        .unwrap();
    // Nobody reads failures: they are logged (warn) instead.
    for i in 0..1_500 {
        let record = UserRecord::new(format!("{DATA} {i}"), format!("{KEY}-{i}"));
        producer.put_record(record).await.unwrap();
    }
    // A record the server refuses: bisected and failed, with its key in the request.
    let refused = format!("{KEY}-{}", "é".repeat(180));
    producer.put(DATA, refused).await.unwrap();
    producer.stop().await;
    let stats = producer.stats();
    assert!(
        stats.throttled_entries > 0 && stats.user_records_failed == 1,
        "{stats:?}"
    );

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logs.contains("producer stopped"), "the capture works");
    assert!(logs.contains("records failed and no failure stream is subscribed"));
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // Partition keys stay out of the producer's own events. (The SDK's TRACE events print
    // HTTP response bodies, and a server's ValidationException message quotes the value it
    // refused, partition keys included: README says so.)
    let ours = logs
        .lines()
        .filter(|line| line.contains(" kinesis_producer::"));
    assert!(ours.clone().count() > 0);
    for line in ours {
        assert!(!line.contains(KEY), "a partition key in {line}");
        assert!(!line.contains(ACCESS), "the access key id in {line}");
    }
    // The SDK's TRACE request log shows the signed Authorization header, which names the
    // access key id (an identifier, not a secret); the secrets themselves appear nowhere.
    for planted in [DATA, SECRET, TOKEN] {
        assert!(!logs.contains(planted), "{planted} is in the logs");
        // Base64 of a planted text, at each alignment, as a request body would carry it.
        for shift in 0..3 {
            let encoded = b64(&format!("{}{planted}", &"xx"[..shift]));
            let core = &encoded[4..encoded.len() - 4];
            assert!(
                !logs.contains(core),
                "{planted} is in the logs, base64-encoded"
            );
        }
    }
    println!("{} bytes of TRACE logs checked", logs.len());
}
