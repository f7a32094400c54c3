//! `kinesis-producer tail`: reads a stream and prints one JSON line per user record.
//!
//! Every shard is read, parents before children: a shard starts once each of its parents that
//! the stream still lists has been read to its end, so records of one key come out in order
//! across a split or a merge. When a shard ends, the shard list is loaded again to find its
//! children, so a reshard during the tail is followed.

use std::collections::{HashSet, VecDeque};
use std::io::{BufWriter, Write};
use std::time::Duration;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::primitives::{DateTime, DateTimeFormat};
use aws_sdk_kinesis::types::{Record, ShardIteratorType};
use aws_sdk_kinesis::Client;
use base64::Engine;
use kinesis_producer::deaggregate;

use crate::StreamArgs;

#[derive(clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    stream: StreamArgs,
    /// Where to start: `trim-horizon` (the oldest record), `latest` (only new records),
    /// `at-sequence N` (needs --shard), or `at-timestamp T` (RFC 3339, or seconds since the
    /// epoch).
    #[arg(long, num_args = 1..=2, value_names = ["POSITION", "VALUE"], default_value = "trim-horizon")]
    from: Vec<String>,
    /// Reads only this shard (and the shards it splits or merges into).
    #[arg(long)]
    shard: Option<String>,
    /// Stops after printing this many user records.
    #[arg(long)]
    limit: Option<u64>,
    /// Stops once every shard has been read to its current end, instead of waiting for more.
    #[arg(long)]
    no_follow: bool,
    /// How long to wait before asking a shard that had nothing new again, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    poll_interval_ms: u64,
}

/// Where reading starts.
#[derive(Debug, Clone)]
enum Start {
    TrimHorizon,
    Latest,
    AtSequence(String),
    AtTimestamp(DateTime),
}

impl Start {
    fn parse(words: &[String]) -> Result<Start, String> {
        let value = || {
            words
                .get(1)
                .cloned()
                .ok_or_else(|| format!("--from {} needs a value", words[0]))
        };
        let start = match words.first().map(String::as_str) {
            Some("trim-horizon") => Start::TrimHorizon,
            Some("latest") => Start::Latest,
            Some("at-sequence") => Start::AtSequence(value()?),
            Some("at-timestamp") => Start::AtTimestamp(parse_timestamp(&value()?)?),
            other => {
                return Err(format!(
                    "--from {}: expected trim-horizon, latest, at-sequence N or at-timestamp T",
                    other.unwrap_or_default()
                ))
            }
        };
        let takes_value = matches!(start, Start::AtSequence(_) | Start::AtTimestamp(_));
        if words.len() == 2 && !takes_value {
            return Err(format!("--from {} takes no value", words[0]));
        }
        Ok(start)
    }
}

fn parse_timestamp(text: &str) -> Result<DateTime, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok(DateTime::from_secs_f64(seconds));
        }
    }
    DateTime::from_str(text, DateTimeFormat::DateTime).map_err(|_| {
        format!("--from at-timestamp {text}: expected RFC 3339 (2026-11-22T10:00:00Z) or seconds since the epoch")
    })
}

/// A shard as ListShards describes it.
#[derive(Debug, Clone)]
struct ShardInfo {
    id: String,
    parents: Vec<String>,
}

/// A shard being read.
struct Reader {
    shard_id: String,
    iterator: String,
    /// The last sequence number printed, to renew an expired iterator after it.
    last_sequence: Option<String>,
    /// Where an expired iterator starts again while nothing was printed: where the reader
    /// started (`--from latest` as the time it started, so that what arrived since is read).
    restart: Start,
    /// The last answer had nothing and the shard is not behind.
    at_tip: bool,
}

pub async fn run(args: TailArgs) -> Result<bool, String> {
    let start = Start::parse(&args.from)?;
    if matches!(start, Start::AtSequence(_)) && args.shard.is_none() {
        return Err(
            "--from at-sequence needs --shard: sequence numbers belong to one shard".into(),
        );
    }
    let stream = StreamRef::from(&args.stream)?;
    let client = args.stream.client().await;
    let shards = list_shards(&client, &stream).await?;
    let mut tail = Tail {
        client,
        stream,
        out: BufWriter::new(std::io::stdout().lock()),
        printed: 0,
        limit: args.limit,
        started: HashSet::new(),
        ended: HashSet::new(),
        readers: VecDeque::new(),
    };
    let first: Vec<ShardInfo> = match &args.shard {
        Some(id) => match shards.iter().find(|s| &s.id == id) {
            Some(shard) => vec![shard.clone()],
            None => return Err(format!("the stream has no shard {id}")),
        },
        None => {
            let listed: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
            shards
                .iter()
                .filter(|s| s.parents.iter().all(|p| !listed.contains(p.as_str())))
                .cloned()
                .collect()
        }
    };
    for shard in first {
        tail.open(&shard.id, &start).await?;
    }
    let poll = Duration::from_millis(args.poll_interval_ms);
    loop {
        if tail.limit_reached() {
            break;
        }
        // No reader left: every shard read ended with no child to go on with.
        let all_at_tip = tail.readers.iter().all(|r| r.at_tip);
        if tail.readers.is_empty() || (args.no_follow && all_at_tip) {
            break;
        }
        let mut got_any = false;
        for _ in 0..tail.readers.len() {
            got_any |= tail.read_next().await?;
            if tail.limit_reached() {
                break;
            }
        }
        tail.out
            .flush()
            .map_err(|e| format!("writing stdout: {e}"))?;
        if !got_any {
            tokio::time::sleep(poll).await;
        }
    }
    tail.out
        .flush()
        .map_err(|e| format!("writing stdout: {e}"))?;
    Ok(true)
}

/// The stream, as ListShards and GetShardIterator name it.
enum StreamRef {
    Name(String),
    Arn(String),
}

impl StreamRef {
    fn from(args: &StreamArgs) -> Result<StreamRef, String> {
        match (&args.stream_name, &args.stream_arn) {
            (Some(name), _) => Ok(StreamRef::Name(name.clone())),
            (None, Some(arn)) => Ok(StreamRef::Arn(arn.clone())),
            (None, None) => Err("give --stream-name or --stream-arn".into()),
        }
    }
}

/// Every shard of the stream, open and closed, with its parents.
async fn list_shards(client: &Client, stream: &StreamRef) -> Result<Vec<ShardInfo>, String> {
    let mut shards = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        let request = match (&next_token, stream) {
            (Some(token), _) => client.list_shards().next_token(token),
            (None, StreamRef::Name(name)) => client.list_shards().stream_name(name),
            (None, StreamRef::Arn(arn)) => client.list_shards().stream_arn(arn),
        };
        let page = request
            .send()
            .await
            .map_err(|e| format!("ListShards failed: {}", describe(&e)))?;
        for shard in page.shards() {
            let parents = [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
                .into_iter()
                .flatten()
                .map(str::to_owned)
                .collect();
            shards.push(ShardInfo {
                id: shard.shard_id().to_owned(),
                parents,
            });
        }
        match page.next_token() {
            Some(token) => next_token = Some(token.to_owned()),
            None => return Ok(shards),
        }
    }
}

fn describe<E: ProvideErrorMetadata + std::fmt::Display>(error: &E) -> String {
    match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => error.to_string(),
    }
}

struct Tail<W: Write> {
    client: Client,
    stream: StreamRef,
    out: W,
    printed: u64,
    limit: Option<u64>,
    started: HashSet<String>,
    ended: HashSet<String>,
    readers: VecDeque<Reader>,
}

impl<W: Write> Tail<W> {
    fn limit_reached(&self) -> bool {
        self.limit.is_some_and(|limit| self.printed >= limit)
    }

    async fn iterator(&self, shard_id: &str, start: &Start) -> Result<String, String> {
        let mut request = self.client.get_shard_iterator().shard_id(shard_id);
        request = match &self.stream {
            StreamRef::Name(name) => request.stream_name(name),
            StreamRef::Arn(arn) => request.stream_arn(arn),
        };
        request = match start {
            Start::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            Start::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            Start::AtSequence(n) => request
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(n),
            Start::AtTimestamp(t) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(*t),
        };
        let answer = request
            .send()
            .await
            .map_err(|e| format!("GetShardIterator for {shard_id} failed: {}", describe(&e)))?;
        answer
            .shard_iterator()
            .map(str::to_owned)
            .ok_or_else(|| format!("GetShardIterator for {shard_id} returned no iterator"))
    }

    async fn open(&mut self, shard_id: &str, start: &Start) -> Result<(), String> {
        if !self.started.insert(shard_id.to_owned()) {
            return Ok(());
        }
        let restart = match start {
            Start::Latest => Start::AtTimestamp(DateTime::from(std::time::SystemTime::now())),
            other => other.clone(),
        };
        let iterator = self.iterator(shard_id, start).await?;
        self.readers.push_back(Reader {
            shard_id: shard_id.to_owned(),
            iterator,
            last_sequence: None,
            restart,
            at_tip: false,
        });
        Ok(())
    }

    /// Reads once from the reader at the front and puts it at the back (or retires it when its
    /// shard has ended). Returns whether it printed anything.
    async fn read_next(&mut self) -> Result<bool, String> {
        let Some(mut reader) = self.readers.pop_front() else {
            return Ok(false);
        };
        let answer = self
            .client
            .get_records()
            .shard_iterator(&reader.iterator)
            .limit(10_000)
            .send()
            .await;
        let output = match answer {
            Ok(output) => output,
            Err(error) => {
                let code = error.code().unwrap_or_default().to_owned();
                match code.as_str() {
                    "ExpiredIteratorException" => {
                        let start = match &reader.last_sequence {
                            Some(n) => Start::AtSequence(n.clone()),
                            None => reader.restart.clone(),
                        };
                        reader.iterator = self.iterator(&reader.shard_id, &start).await?;
                        // AT the last printed record: skip it on the next read.
                        self.readers.push_back(reader);
                        return Ok(false);
                    }
                    "ProvisionedThroughputExceededException" | "ThrottlingException" => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        self.readers.push_back(reader);
                        return Ok(false);
                    }
                    _ => {
                        return Err(format!(
                            "GetRecords on {} failed: {}",
                            reader.shard_id,
                            describe(&error)
                        ))
                    }
                }
            }
        };
        let mut printed_any = false;
        for record in output.records() {
            if reader.last_sequence.as_deref() == Some(record.sequence_number()) {
                continue; // already printed before an iterator renewal
            }
            printed_any |= self.print(&reader.shard_id, record)?;
            reader.last_sequence = Some(record.sequence_number().to_owned());
            if self.limit_reached() {
                break;
            }
        }
        reader.at_tip =
            output.records().is_empty() && output.millis_behind_latest().unwrap_or(0) == 0;
        match output.next_shard_iterator() {
            Some(next) => {
                reader.iterator = next.to_owned();
                self.readers.push_back(reader);
            }
            None => {
                // The shard is closed and read to its end: its children may start.
                self.ended.insert(reader.shard_id.clone());
                self.open_children().await?;
            }
        }
        Ok(printed_any)
    }

    /// Starts every shard whose listed parents have all ended.
    async fn open_children(&mut self) -> Result<(), String> {
        let shards = list_shards(&self.client, &self.stream).await?;
        let listed: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
        for shard in &shards {
            let is_child = shard.parents.iter().any(|p| self.ended.contains(p));
            let parents_done = shard
                .parents
                .iter()
                .all(|p| self.ended.contains(p) || !listed.contains(p.as_str()));
            if is_child && parents_done && !self.started.contains(&shard.id) {
                self.open(&shard.id, &Start::TrimHorizon).await?;
            }
        }
        Ok(())
    }

    /// Prints the user records of one Kinesis record. Returns whether it printed any.
    fn print(&mut self, shard_id: &str, record: &Record) -> Result<bool, String> {
        let data = bytes::Bytes::copy_from_slice(record.data().as_ref());
        let arrival = record
            .approximate_arrival_timestamp()
            .and_then(|t| t.to_millis().ok());
        let partition_key = record.partition_key().unwrap_or_default();
        let users = match deaggregate(data.clone(), partition_key) {
            Ok(users) => users,
            Err(error) => {
                // Shown as it is, with the reason: a tail must not hide what is in the stream.
                let mut line = line_for(shard_id, record, arrival, 0, false, None, &data);
                line["deaggregation_error"] = error.to_string().into();
                self.write_line(&line)?;
                return Ok(true);
            }
        };
        let mut printed = false;
        for user in users {
            if self.limit_reached() {
                break;
            }
            let mut line = line_for(
                shard_id,
                record,
                arrival,
                user.sub_sequence_number,
                user.aggregated,
                user.explicit_hash_key.as_deref(),
                &user.data,
            );
            line["partition_key"] = user.partition_key.into();
            self.write_line(&line)?;
            printed = true;
        }
        Ok(printed)
    }

    fn write_line(&mut self, line: &serde_json::Value) -> Result<(), String> {
        self.printed += 1;
        writeln!(self.out, "{line}").map_err(|e| format!("writing stdout: {e}"))
    }
}

fn line_for(
    shard_id: &str,
    record: &Record,
    arrival: Option<i64>,
    sub_sequence_number: u64,
    aggregated: bool,
    explicit_hash_key: Option<&str>,
    data: &[u8],
) -> serde_json::Value {
    let (data, encoding) = match std::str::from_utf8(data) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(data),
            "base64",
        ),
    };
    let mut line = serde_json::json!({
        "shard_id": shard_id,
        "sequence_number": record.sequence_number(),
        "sub_sequence_number": sub_sequence_number,
        "aggregated": aggregated,
        "partition_key": record.partition_key().unwrap_or_default(),
        "data": data,
        "data_encoding": encoding,
    });
    if let Some(ehk) = explicit_hash_key {
        line["explicit_hash_key"] = ehk.into();
    }
    if let Some(ms) = arrival {
        line["approximate_arrival_ms"] = ms.into();
    }
    line
}
