//! An HTTP fault layer between the real SDK client and the embedded Kinesis server, driven by a
//! seeded schedule so that a failing run can be replayed (`KP_FAULT_SEED`).
//!
//! It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) to sit in the middle:
//! each PutRecords request either passes, or suffers one fault drawn from the schedule. Other
//! operations (ListShards, DescribeStreamSummary) pass untouched unless a test asks otherwise
//! (`refuse_list_shards`, `edit_listings`, `expire_next_get_records`). It counts the user records
//! whose outcome it made ambiguous (written by the server, but not acknowledged to the client),
//! the only records that may legitimately appear twice in the stream.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use kinesis_producer::deaggregate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::rng::Rng;

/// What can happen to one PutRecords request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Answered with this status and error code without being forwarded.
    Refuse(u16, &'static str),
    /// Forwarded; then some per-record successes are turned into this error code (the records
    /// were written: retrying them writes them twice).
    FailEntries(&'static str),
    /// The connection is reset before the request is forwarded.
    ResetBefore,
    /// Forwarded; the connection is reset before the answer reaches the client (ambiguous).
    ResetAfter,
    /// Forwarded; the answer is held past the client's request timeout (ambiguous).
    Delay(Duration),
}

impl Fault {
    /// Every fault the layer can inject, with a request timeout of `timeout`.
    pub fn all(timeout: Duration) -> Vec<Fault> {
        vec![
            Fault::Refuse(500, "InternalFailure"),
            Fault::Refuse(503, "ServiceUnavailable"),
            Fault::Refuse(400, "ThrottlingException"),
            Fault::Refuse(400, "ProvisionedThroughputExceededException"),
            Fault::FailEntries("ProvisionedThroughputExceededException"),
            Fault::FailEntries("InternalFailure"),
            Fault::ResetBefore,
            Fault::ResetAfter,
            Fault::Delay(timeout + Duration::from_millis(300)),
        ]
    }

    /// Whether the records of a request hit by this fault may have been written.
    pub fn ambiguous(self) -> bool {
        matches!(
            self,
            Fault::FailEntries(_) | Fault::ResetAfter | Fault::Delay(_)
        )
    }
}

/// The schedule: each PutRecords request is faulted with probability `rate`, by one of `faults`
/// chosen at random.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub seed: u64,
    pub rate: f64,
    pub faults: Vec<Fault>,
}

impl Schedule {
    /// The seed from `KP_FAULT_SEED`, else `default_seed`; printed so a run can be replayed.
    pub fn new(default_seed: u64, rate: f64, faults: Vec<Fault>) -> Self {
        let seed = std::env::var("KP_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_seed);
        println!("fault schedule: seed {seed} (replay with KP_FAULT_SEED={seed}), rate {rate}");
        Schedule { seed, rate, faults }
    }
}

#[derive(Default)]
pub struct Counts {
    pub requests: AtomicU64,
    pub faulted: AtomicU64,
    /// User records in Kinesis records whose outcome a fault made ambiguous.
    pub ambiguous_records: AtomicU64,
    pub by_fault: Mutex<Vec<(Fault, u64)>>,
    /// Connections that sent a request during an outage (each request in flight has its own).
    pub held: AtomicU64,
    /// Requests forwarded that no fault touched, or whose entries the layer failed, but whose
    /// answer came late (see `LATE_ANSWER`): their records count as ambiguous too (those of
    /// failed entries once).
    pub late_answers: AtomicU64,
}

/// A forwarded request whose answer takes longer than this to come back from the server may
/// reach the client after its request timeout (800 ms in `tests/faults.rs`; the client's clock
/// also counts the time the request took to reach the proxy): the client then retries records
/// the server wrote. On a loaded machine that happens without any fault, so such a request's
/// records count as ambiguous, like those of an injected delay.
const LATE_ANSWER: Duration = Duration::from_millis(400);

impl Counts {
    fn record(&self, fault: Fault) {
        self.faulted.fetch_add(1, Ordering::Relaxed);
        let mut by = self.by_fault.lock().unwrap();
        match by.iter_mut().find(|(f, _)| *f == fault) {
            Some((_, n)) => *n += 1,
            None => by.push((fault, 1)),
        }
    }
}

pub struct FaultProxy {
    pub endpoint: String,
    pub counts: Arc<Counts>,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    upstream: String,
    schedule: Mutex<(Schedule, Rng)>,
    counts: Arc<Counts>,
    stalled: AtomicBool,
    /// ListShards answered with a 500, not forwarded.
    refuse_list_shards: AtomicBool,
    /// The next PutRecords answer names, for every written entry, a shard no map has.
    misroute_next: AtomicBool,
    /// The next GetRecords is answered ExpiredIteratorException, not forwarded.
    expire_next_get_records: AtomicBool,
    /// Edits the `Shards` of each ListShards answer (see `edit_listings`).
    listing_edit: Mutex<Option<ListingEdit>>,
    /// Holds each PutRecords answer back this long (see `delay_answers`).
    answer_delay: Mutex<Option<Duration>>,
}

/// Changes the shards a ListShards answer lists, as a listing taken while the stream changes
/// can: `edit_listings`.
pub type ListingEdit = Box<dyn Fn(&mut Vec<serde_json::Value>) + Send + Sync>;

impl FaultProxy {
    pub async fn start(upstream: &str, schedule: Schedule) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let counts = Arc::new(Counts::default());
        let rng = Rng(schedule.seed.max(1));
        let shared = Arc::new(Shared {
            upstream: upstream.trim_start_matches("http://").to_owned(),
            schedule: Mutex::new((schedule, rng)),
            counts: Arc::clone(&counts),
            stalled: AtomicBool::new(false),
            refuse_list_shards: AtomicBool::new(false),
            misroute_next: AtomicBool::new(false),
            expire_next_get_records: AtomicBool::new(false),
            listing_edit: Mutex::new(None),
            answer_delay: Mutex::new(None),
        });
        let serving = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(Arc::clone(&serving), client));
            }
        });
        FaultProxy {
            endpoint,
            counts,
            shared,
            accept,
        }
    }

    /// A slow round trip: each PutRecords request is forwarded at once and its answer (the
    /// server's, or a fault's) reaches the client `delay` later. `None`: at once.
    pub fn delay_answers(&self, delay: Option<Duration>) {
        *self.shared.answer_delay.lock().unwrap() = delay;
    }

    /// An outage: requests are held unanswered (and never forwarded) until `resume`.
    pub fn stall(&self) {
        self.shared.stalled.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.shared.stalled.store(false, Ordering::SeqCst);
    }

    /// ListShards fails (500) while `refuse` is set.
    pub fn refuse_list_shards(&self, refuse: bool) {
        self.shared
            .refuse_list_shards
            .store(refuse, Ordering::SeqCst);
    }

    /// The next PutRecords answer says each written entry landed on [`MISROUTED_SHARD`], a
    /// shard the stream does not have (the records were written to their real shards).
    pub fn misroute_next_answer(&self) {
        self.shared.misroute_next.store(true, Ordering::SeqCst);
    }

    /// The next GetRecords is answered with ExpiredIteratorException (as after five minutes
    /// without a read).
    pub fn expire_next_get_records(&self) {
        self.shared
            .expire_next_get_records
            .store(true, Ordering::SeqCst);
    }

    /// Whether an expiry asked for by `expire_next_get_records` is still waiting for a
    /// GetRecords to answer (false once it was served).
    pub fn expiry_pending(&self) -> bool {
        self.shared.expire_next_get_records.load(Ordering::SeqCst)
    }

    /// Every ListShards answer from now on has its `Shards` (the JSON objects of one page)
    /// changed by `edit`; `None` passes them untouched again.
    pub fn edit_listings(&self, edit: Option<ListingEdit>) {
        *self.shared.listing_edit.lock().unwrap() = edit;
    }

    /// Stops injecting faults: requests pass from now on.
    pub fn heal(&self) {
        self.shared.schedule.lock().unwrap().0.faults.clear();
    }

    pub fn summary(&self) -> String {
        let by = self.counts.by_fault.lock().unwrap();
        format!(
            "{} PutRecords requests, {} faulted ({:?}), {} answered late, {} user records made ambiguous",
            self.counts.requests.load(Ordering::Relaxed),
            self.counts.faulted.load(Ordering::Relaxed),
            *by,
            self.counts.late_answers.load(Ordering::Relaxed),
            self.counts.ambiguous_records.load(Ordering::Relaxed)
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One HTTP/1.1 message: head (start line and headers, with the final CRLFCRLF) and body.
struct Message {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<String> {
        let head = String::from_utf8_lossy(&self.head);
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        out.extend_from_slice(&self.body);
        out
    }

    /// The same message with another body (and its Content-Length).
    fn with_body(&self, body: Vec<u8>) -> Message {
        let head = String::from_utf8_lossy(&self.head);
        let mut lines: Vec<String> = head
            .trim_end_matches("\r\n")
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("content-length:"))
            .map(str::to_owned)
            .collect();
        lines.push(format!("content-length: {}", body.len()));
        Message {
            head: format!("{}\r\n\r\n", lines.join("\r\n")).into_bytes(),
            body,
        }
    }
}

/// Reads one message, or `None` when the peer closed the connection.
async fn read_message(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Message> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head_len = end + 4;
            let head = buffer[..head_len].to_vec();
            let partial = Message {
                head: head.clone(),
                body: Vec::new(),
            };
            let length: usize = partial
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buffer.len() < head_len + length {
                let mut chunk = [0u8; 65536];
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            let body = buffer[head_len..head_len + length].to_vec();
            buffer.drain(..head_len + length);
            return Some(Message { head, body });
        }
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Closes with a reset (RST) rather than an orderly close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(shared: Arc<Shared>, mut client: TcpStream) {
    // Connected at the first request forwarded: a connection that only meets an outage never
    // reaches the server.
    let mut upstream: Option<TcpStream> = None;
    let (mut from_client, mut from_upstream) = (Vec::new(), Vec::new());
    loop {
        // An outage reads nothing: the client's request sits unread until it gives up, and the
        // connection is reset when the outage ends (nothing was forwarded).
        let request = tokio::select! {
            request = read_message(&mut client, &mut from_client) => request,
            () = wait_for(&shared.stalled, true) => None,
        };
        let read_one = request.is_some();
        let Some(request) = request.filter(|_| !shared.stalled.load(Ordering::SeqCst)) else {
            // Read and drop what the client sends, so that a client giving up (closing) frees
            // the connection at once; reset the rest when the outage ends.
            let mut scratch = vec![0u8; 65536];
            let mut held = read_one || !from_client.is_empty();
            if held {
                shared.counts.held.fetch_add(1, Ordering::Relaxed);
            }
            loop {
                tokio::select! {
                    read = client.read(&mut scratch) => {
                        if !matches!(read, Ok(n) if n > 0) {
                            return;
                        }
                        if !std::mem::replace(&mut held, true) {
                            shared.counts.held.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    () = wait_for(&shared.stalled, false) => {
                        reset(client);
                        return;
                    }
                }
            }
        };
        let target = request.header("x-amz-target").unwrap_or_default();
        let put_records = target.ends_with(".PutRecords");
        let refusal = if target.ends_with(".ListShards")
            && shared.refuse_list_shards.load(Ordering::SeqCst)
        {
            Some((500, "InternalFailure"))
        } else if target.ends_with(".GetRecords")
            && shared.expire_next_get_records.swap(false, Ordering::SeqCst)
        {
            Some((400, "ExpiredIteratorException"))
        } else {
            None
        };
        if let Some((status, code)) = refusal {
            let answer = error_answer(status, code);
            if client.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        let fault = if put_records {
            shared.counts.requests.fetch_add(1, Ordering::Relaxed);
            let mut guard = shared.schedule.lock().unwrap();
            let (schedule, rng) = &mut *guard;
            let hit =
                !schedule.faults.is_empty() && (rng.below(1_000_000) as f64) < schedule.rate * 1e6;
            hit.then(|| schedule.faults[rng.below(schedule.faults.len() as u64) as usize])
        } else {
            None
        };
        if let Some(fault) = fault {
            shared.counts.record(fault);
        }
        match fault {
            Some(Fault::Refuse(status, code)) => {
                let answer = error_answer(status, code);
                if client.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            Some(Fault::ResetBefore) => {
                reset(client);
                return;
            }
            _ => {}
        }
        if upstream.is_none() {
            upstream = TcpStream::connect(&shared.upstream).await.ok();
        }
        let Some(server) = upstream.as_mut() else {
            return;
        };
        let forwarded = tokio::time::Instant::now();
        if server.write_all(&request.bytes()).await.is_err() {
            return;
        }
        let Some(answer) = read_message(server, &mut from_upstream).await else {
            return;
        };
        if put_records && !fault.is_some_and(Fault::ambiguous) && forwarded.elapsed() > LATE_ANSWER
        {
            shared.counts.late_answers.fetch_add(1, Ordering::Relaxed);
            shared
                .counts
                .ambiguous_records
                .fetch_add(user_records_in(&request.body), Ordering::Relaxed);
        }
        let answer = match fault {
            Some(Fault::FailEntries(code)) => {
                let per_entry = user_records_per_entry(&request.body);
                let (answer, failed) = fail_entries(&shared, &per_entry, answer, code);
                // The layer's own work on a large body (parsing it, decoding each failed entry;
                // slow in a debug build) can hold the answer past the producer's timeout on a
                // loaded machine, which then sends every entry again: the entries not failed
                // are ambiguous too.
                if forwarded.elapsed() > LATE_ANSWER {
                    shared.counts.late_answers.fetch_add(1, Ordering::Relaxed);
                    let not_failed: u64 = per_entry
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !failed.contains(i))
                        .map(|(_, n)| n)
                        .sum();
                    shared
                        .counts
                        .ambiguous_records
                        .fetch_add(not_failed, Ordering::Relaxed);
                }
                answer
            }
            Some(Fault::ResetAfter) => {
                shared
                    .counts
                    .ambiguous_records
                    .fetch_add(user_records_in(&request.body), Ordering::Relaxed);
                reset(client);
                return;
            }
            Some(Fault::Delay(delay)) => {
                shared
                    .counts
                    .ambiguous_records
                    .fetch_add(user_records_in(&request.body), Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                answer
            }
            _ => answer,
        };
        let delay = *shared.answer_delay.lock().unwrap();
        if let Some(delay) = delay.filter(|_| put_records) {
            tokio::time::sleep(delay).await;
        }
        let answer = if put_records && shared.misroute_next.swap(false, Ordering::SeqCst) {
            misroute(answer)
        } else if target.ends_with(".ListShards") {
            edit_listing(&shared, answer)
        } else {
            answer
        };
        if client.write_all(&answer.bytes()).await.is_err() {
            return;
        }
    }
}

/// A Kinesis JSON error answer with `status` and `code`, as the fault layer's own.
fn error_answer(status: u16, code: &str) -> String {
    let body = format!(r#"{{"__type":"{code}","message":"injected by the fault layer"}}"#);
    let reason = if status >= 500 {
        "Error"
    } else {
        "Bad Request"
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/x-amz-json-1.1\r\nx-amzn-errortype: {code}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn wait_for(flag: &AtomicBool, value: bool) {
    while flag.load(Ordering::SeqCst) != value {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Turns about half of the successful entries of a PutRecords answer into `code` failures,
/// counting the user records they carry (`per_entry`, from the request) as ambiguous (they
/// were written). Gives back the answer and the failed entries' positions.
fn fail_entries(
    shared: &Shared,
    per_entry: &[u64],
    answer: Message,
    code: &str,
) -> (Message, Vec<usize>) {
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&answer.body) else {
        return (answer, Vec::new());
    };
    let Some(records) = json.get_mut("Records").and_then(|r| r.as_array_mut()) else {
        return (answer, Vec::new());
    };
    let mut failed = Vec::new();
    {
        let mut guard = shared.schedule.lock().unwrap();
        let rng = &mut guard.1;
        for (index, entry) in records.iter_mut().enumerate() {
            if entry.get("SequenceNumber").is_some() && rng.below(2) == 0 {
                *entry = serde_json::json!({"ErrorCode": code, "ErrorMessage": "injected by the fault layer"});
                failed.push(index);
            }
        }
    }
    let failed_count = records
        .iter()
        .filter(|e| e.get("ErrorCode").is_some())
        .count();
    json["FailedRecordCount"] = failed_count.into();
    let ambiguous: u64 = failed
        .iter()
        .map(|&i| per_entry.get(i).copied().unwrap_or(0))
        .sum();
    shared
        .counts
        .ambiguous_records
        .fetch_add(ambiguous, Ordering::Relaxed);
    (
        answer.with_body(serde_json::to_vec(&json).expect("JSON")),
        failed,
    )
}

/// The shard a misrouted answer names.
pub const MISROUTED_SHARD: &str = "shardId-000000009999";

/// The answer with the JSON array `member` of its body changed by `edit` (unchanged if the
/// body has no such array).
fn edit_array(
    answer: Message,
    member: &str,
    edit: impl FnOnce(&mut Vec<serde_json::Value>),
) -> Message {
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&answer.body) else {
        return answer;
    };
    let Some(array) = json.get_mut(member).and_then(|a| a.as_array_mut()) else {
        return answer;
    };
    edit(array);
    answer.with_body(serde_json::to_vec(&json).expect("JSON"))
}

/// The answer with every written entry's shard replaced by [`MISROUTED_SHARD`].
fn misroute(answer: Message) -> Message {
    edit_array(answer, "Records", |records| {
        for entry in records {
            if entry.get("ShardId").is_some() {
                entry["ShardId"] = MISROUTED_SHARD.into();
            }
        }
    })
}

/// A ListShards answer with its shards changed by the edit `edit_listings` set, if any.
fn edit_listing(shared: &Shared, answer: Message) -> Message {
    match shared.listing_edit.lock().unwrap().as_ref() {
        Some(edit) => edit_array(answer, "Shards", edit),
        None => answer,
    }
}

/// User records in a PutRecords request body.
fn user_records_in(request: &[u8]) -> u64 {
    user_records_per_entry(request).iter().sum()
}

/// User records in each entry of a PutRecords request body, in order.
fn user_records_per_entry(request: &[u8]) -> Vec<u64> {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(request) else {
        return Vec::new();
    };
    let Some(entries) = json.get("Records").and_then(|r| r.as_array()) else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|entry| {
            let data = entry["Data"].as_str().unwrap_or_default();
            let key = entry["PartitionKey"].as_str().unwrap_or_default();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap_or_default();
            deaggregate(bytes::Bytes::from(bytes), key).map_or(1, |records| records.len() as u64)
        })
        .collect()
}
