//! An embedded Kinesis (ferrokinesis) on 127.0.0.1, with helpers to create streams and read
//! them back. Shared by the integration tests and the quickstart example.
#![allow(dead_code)]

use std::collections::HashMap;

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::types::{ShardIteratorType, StreamStatus};
use aws_sdk_kinesis::Client;
use axum::extract::DefaultBodyLimit;
use ferrokinesis::store::StoreOptions;
use kinesis_producer::{deaggregate, DeaggregatedRecord, Deaggregator};

pub struct LocalKinesis {
    pub endpoint: String,
    pub client: Client,
    server: tokio::task::JoinHandle<()>,
}

/// One Kinesis record as GetRecords returns it.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub shard_id: String,
    pub sequence_number: String,
    pub partition_key: String,
    pub data: Vec<u8>,
    /// Milliseconds since the epoch, as the server stamped the record.
    pub arrived_ms: i64,
}

/// One user record as a consumer reads it.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub shard_id: String,
    pub sequence_number: String,
    pub record: DeaggregatedRecord,
}

impl LocalKinesis {
    /// Starts the server. With `enforce_limits`, it throttles each shard to 1 MiB/s and
    /// 1000 records/s, as Kinesis does.
    pub async fn start(enforce_limits: bool) -> Self {
        let (app, _store) = ferrokinesis::create_app(StoreOptions {
            create_stream_ms: 0,
            update_stream_ms: 0,
            delete_stream_ms: 0,
            shard_limit: 1000,
            enforce_limits,
            ..Default::default()
        });
        // axum's default 2 MB body limit would refuse full 5 MiB PutRecords requests.
        let app = app.layer(DefaultBodyLimit::max(16 << 20));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let endpoint = format!("http://{}", listener.local_addr().expect("local addr"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let client = client_for(&endpoint);
        LocalKinesis {
            endpoint,
            client,
            server,
        }
    }

    pub async fn create_stream(&self, name: &str, shards: i32) {
        self.client
            .create_stream()
            .stream_name(name)
            .shard_count(shards)
            .send()
            .await
            .expect("CreateStream");
        self.wait_active(name).await;
    }

    pub async fn wait_active(&self, name: &str) {
        wait_active(&self.client, name).await;
    }

    /// The open shards, sorted by starting hash key: (shard id, start, end).
    pub async fn open_shards(&self, stream: &str) -> Vec<(String, u128, u128)> {
        open_shards(&self.client, stream).await
    }

    /// Every Kinesis record in the stream, from every shard (open or closed), as stored.
    pub async fn read_raw(&self, stream: &str) -> Vec<RawRecord> {
        read_raw(&self.client, stream).await
    }

    /// What a KCL consumer of the stream receives: see [`read_as_kcl`].
    pub async fn read_as_kcl(&self, stream: &str) -> (Vec<ReadRecord>, usize) {
        read_as_kcl(&self.client, stream).await
    }

    /// Every user record in the stream, from every shard (open or closed), de-aggregated.
    pub async fn read_all(&self, stream: &str) -> Vec<ReadRecord> {
        let mut out = Vec::new();
        for raw in self.read_raw(stream).await {
            let users = deaggregate(raw.data, &raw.partition_key)
                .expect("every aggregate in the stream decodes");
            out.extend(users.into_iter().map(|user| ReadRecord {
                shard_id: raw.shard_id.clone(),
                sequence_number: raw.sequence_number.clone(),
                record: user,
            }));
        }
        out
    }

    /// Hash key ranges of every shard, by shard id.
    pub async fn hash_ranges(&self, stream: &str) -> HashMap<String, (u128, u128)> {
        hash_ranges(&self.client, stream).await
    }
}

impl Drop for LocalKinesis {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Every Kinesis record in the stream, from every shard (open or closed), as stored.
pub async fn read_raw(client: &Client, stream: &str) -> Vec<RawRecord> {
    let mut out = Vec::new();
    for shard_id in hash_ranges(client, stream).await.into_keys() {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(&shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("GetShardIterator")
            .shard_iterator
            .expect("an iterator");
        loop {
            let page = client
                .get_records()
                .shard_iterator(&iterator)
                .limit(10_000)
                .send()
                .await
                .expect("GetRecords");
            out.extend(page.records().iter().map(|record| {
                RawRecord {
                    shard_id: shard_id.clone(),
                    sequence_number: record.sequence_number().to_owned(),
                    partition_key: record.partition_key().unwrap_or_default().to_owned(),
                    data: record.data().as_ref().to_vec(),
                    arrived_ms: record
                        .approximate_arrival_timestamp()
                        .map_or(0, |t| t.to_millis().unwrap_or(0)),
                }
            }));
            match page.next_shard_iterator() {
                Some(next) if !page.records().is_empty() => iterator = next.to_owned(),
                _ => break,
            }
        }
    }
    out.sort_by(|a, b| {
        (&a.shard_id, a.sequence_number.len(), &a.sequence_number).cmp(&(
            &b.shard_id,
            b.sequence_number.len(),
            &b.sequence_number,
        ))
    });
    out
}

/// Hash key ranges of every shard, by shard id.
pub async fn hash_ranges(client: &Client, stream: &str) -> HashMap<String, (u128, u128)> {
    let shards = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("ListShards");
    shards
        .shards()
        .iter()
        .map(|s| {
            let range = s.hash_key_range().expect("range");
            (
                s.shard_id().to_owned(),
                (
                    range.starting_hash_key().parse().expect("decimal"),
                    range.ending_hash_key().parse().expect("decimal"),
                ),
            )
        })
        .collect()
}

/// Waits until the stream is ACTIVE (two minutes at most: some servers are slow).
pub async fn wait_active(client: &Client, stream: &str) {
    let started = std::time::Instant::now();
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .expect("DescribeStreamSummary");
        if summary
            .stream_description_summary()
            .is_some_and(|s| s.stream_status() == &StreamStatus::Active)
        {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "stream {stream} never became ACTIVE"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The open shards, sorted by starting hash key: (shard id, start, end).
pub async fn open_shards(client: &Client, stream: &str) -> Vec<(String, u128, u128)> {
    let out = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("ListShards");
    let mut open: Vec<_> = out
        .shards()
        .iter()
        .filter(|s| {
            s.sequence_number_range()
                .and_then(|r| r.ending_sequence_number())
                .is_none()
        })
        .map(|s| {
            let r = s.hash_key_range().expect("range");
            (
                s.shard_id().to_owned(),
                r.starting_hash_key().parse().expect("decimal"),
                r.ending_hash_key().parse().expect("decimal"),
            )
        })
        .collect();
    open.sort_by_key(|s| s.1);
    open
}

/// How many times each record numbered `0..count` was read, for records whose data is their
/// number in decimal.
pub fn count_by_index(read: &[ReadRecord], count: usize) -> Vec<u32> {
    let mut seen = vec![0u32; count];
    for r in read {
        let index: usize = std::str::from_utf8(&r.record.data)
            .expect("UTF-8")
            .parse()
            .expect("a record number");
        seen[index] += 1;
    }
    seen
}

/// What a KCL consumer of the stream receives, using the crate's KCL-compatible reader: every
/// aggregate holding a record outside the shard it was read from is thrown away whole. Returns
/// the user records delivered and the number of aggregates thrown away.
pub async fn read_as_kcl(client: &Client, stream: &str) -> (Vec<ReadRecord>, usize) {
    let ranges = hash_ranges(client, stream).await;
    let mut delivered = Vec::new();
    let mut discarded = 0;
    for raw in read_raw(client, stream).await {
        let (start, end) = ranges[&raw.shard_id];
        let users = Deaggregator::kcl(start, end)
            .deaggregate(raw.data, &raw.partition_key)
            .expect("the KCL reader never errors");
        if users.is_empty() {
            discarded += 1;
        }
        delivered.extend(users.into_iter().map(|record| ReadRecord {
            shard_id: raw.shard_id.clone(),
            sequence_number: raw.sequence_number.clone(),
            record,
        }));
    }
    (delivered, discarded)
}

/// A real aws-sdk-kinesis client for a local endpoint, with static test credentials.
pub fn client_for(endpoint: &str) -> Client {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "local"))
        .build();
    Client::from_conf(config)
}
