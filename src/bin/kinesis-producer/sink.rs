//! The null sink: a minimal Kinesis endpoint on 127.0.0.1 that speaks just enough of the JSON
//! protocol (ListShards, DescribeStreamSummary, PutRecords) for a real SDK client, with real
//! request signing, to be measured without a storage server in the way. It stores nothing and
//! answers every PutRecords entry with success on the shard that owns its hash key.
//!
//! It does no more work than it must: plain HTTP/1.1 over one thread, no JSON tree and no
//! base64 decoding. A PutRecords body is scanned once for each entry's `PartitionKey` and
//! `ExplicitHashKey`; the answer is written straight into a buffer.
//!
//! `perf --null-sink` runs it in-process on its own thread, whose CPU time is measured apart
//! from the producer's; `perf-sink` runs it standalone so other producers can be measured
//! against the same endpoint.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kinesis_producer::record::{parse_explicit_hash_key, partition_key_hash};
use kinesis_producer::ShardMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the sink answers.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Shards of the stream it pretends to hold, with uniform hash ranges.
    pub shards: usize,
    /// After this many PutRecords requests, stop answering PutRecords: requests are read and
    /// left hanging, as a stalled endpoint does (ListShards and DescribeStreamSummary are
    /// still answered, so a producer can start). `None`: always answer.
    pub stall_after: Option<u64>,
    /// How long each PutRecords answer is held back after its body is read, as the round
    /// trip to a real endpoint would (`None` or zero: at once). Each connection waits on its
    /// own, so requests on other connections go on meanwhile.
    pub answer_delay: Option<std::time::Duration>,
}

/// Counters the sink keeps.
#[derive(Default, Debug)]
pub struct SinkCounters {
    pub put_records_requests: AtomicU64,
    pub entries: AtomicU64,
    pub stalled_requests: AtomicU64,
}

/// What a sink that ran on its own thread did.
#[derive(Debug, Clone, Copy)]
pub struct SinkReport {
    pub put_records_requests: u64,
    pub entries: u64,
    pub stalled_requests: u64,
    /// CPU time (user + system) of the sink's thread.
    pub cpu_seconds: f64,
}

impl SinkCounters {
    /// What the counters say now, with the CPU time the caller measured.
    pub fn report(&self, cpu_seconds: f64) -> SinkReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SinkReport {
            put_records_requests: get(&self.put_records_requests),
            entries: get(&self.entries),
            stalled_requests: get(&self.stalled_requests),
            cpu_seconds,
        }
    }
}

/// A sink running on its own thread; [`stop`](Self::stop) ends it and reports.
pub struct Sink {
    pub endpoint: String,
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<SinkReport>,
}

impl Sink {
    /// Binds `addr` (port 0: any free port) and serves on a new thread.
    pub fn start(addr: SocketAddr, config: SinkConfig) -> io::Result<Sink> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        // The runtime and the listener are made here, so that failing to make them is an error
        // the caller sees rather than a panic on the sink's thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("null-sink".into())
            .spawn(move || {
                let counters = Arc::new(SinkCounters::default());
                runtime.block_on(async {
                    tokio::select! {
                        _ = serve(listener, config, Arc::clone(&counters)) => {}
                        _ = stopped => {}
                    }
                });
                drop(runtime);
                counters.report(crate::usage::thread_cpu_seconds())
            })?;
        Ok(Sink {
            endpoint,
            shutdown,
            thread,
        })
    }

    /// Stops serving (open connections are dropped) and reports.
    pub fn stop(self) -> SinkReport {
        let _ = self.shutdown.send(());
        // The thread only ends by returning its report; a panic there is a bug, passed on.
        self.thread.join().expect("the sink thread does not panic")
    }
}

/// Accepts connections until the listener fails, each served on its own task.
pub async fn serve(listener: TcpListener, config: SinkConfig, counters: Arc<SinkCounters>) {
    let state = Arc::new(State {
        map: ShardMap::uniform(config.shards),
        config,
        counters,
    });
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, Arc::clone(&state)));
    }
}

struct State {
    map: ShardMap,
    config: SinkConfig,
    counters: Arc<SinkCounters>,
}

/// One request's head: what the sink needs of it.
struct Head {
    /// Bytes of the head, blank line included.
    length: usize,
    content_length: usize,
    target: String,
    close: bool,
}

/// Serves one keep-alive connection, request after request. A PutRecords body is scanned as
/// it arrives, entry by entry, so a connection holds at most one entry plus one read, however
/// large the request.
async fn connection(mut stream: TcpStream, state: Arc<State>) {
    let mut buffer: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut answer: Vec<u8> = Vec::with_capacity(64 << 10);
    loop {
        let head = loop {
            match parse_head(&buffer) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(problem) => {
                    let _ = respond(&mut stream, 400, &error_body("BadRequest", problem)).await;
                    return;
                }
            }
            if !read_more(&mut stream, &mut buffer).await {
                return;
            }
        };
        buffer.drain(..head.length);
        let operation = head.target.rsplit('.').next().unwrap_or_default();
        if stalled(&state, operation) {
            state
                .counters
                .stalled_requests
                .fetch_add(1, Ordering::Relaxed);
            // Hold the connection without answering until the client gives up on it.
            drop(buffer);
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        answer.clear();
        let status = if operation == "PutRecords" {
            match put_records(
                &state,
                &mut stream,
                &mut buffer,
                head.content_length,
                &mut answer,
            )
            .await
            {
                Some(status) => status,
                None => return,
            }
        } else {
            while buffer.len() < head.content_length {
                if !read_more(&mut stream, &mut buffer).await {
                    return;
                }
            }
            let body = &buffer[..head.content_length];
            let status = match operation {
                "ListShards" => list_shards(&state.map, body, &mut answer),
                "DescribeStreamSummary" => {
                    describe_stream_summary(&state.map, &mut answer);
                    200
                }
                other => {
                    answer.extend_from_slice(&error_body(
                        "UnknownOperationException",
                        &format!("the null sink does not implement {other:?}"),
                    ));
                    400
                }
            };
            buffer.drain(..head.content_length);
            status
        };
        if let Some(delay) = state
            .config
            .answer_delay
            .filter(|_| operation == "PutRecords")
        {
            tokio::time::sleep(delay).await;
        }
        if respond(&mut stream, status, &answer).await.is_err() || head.close {
            return;
        }
        if buffer.capacity() > 1 << 20 {
            // One very large entry grew it: give the memory back.
            buffer.shrink_to(64 << 10);
        }
    }
}

/// Whether this request is a PutRecords past `stall_after`.
fn stalled(state: &State, operation: &str) -> bool {
    let counted = state.counters.put_records_requests.load(Ordering::Relaxed);
    operation == "PutRecords"
        && state
            .config
            .stall_after
            .is_some_and(|limit| counted >= limit)
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    buffer.reserve(64 << 10);
    matches!(stream.read_buf(buffer).await, Ok(n) if n > 0)
}

/// Parses a request head once its blank line has arrived. Only `Content-Length` bodies are
/// accepted (every AWS SDK sends one for JSON requests).
fn parse_head(buffer: &[u8]) -> Result<Option<Head>, &'static str> {
    let Some(blank) = find(buffer, b"\r\n\r\n") else {
        return if buffer.len() > 64 << 10 {
            Err("request head longer than 64 KiB")
        } else {
            Ok(None)
        };
    };
    let text = std::str::from_utf8(&buffer[..blank]).map_err(|_| "request head is not UTF-8")?;
    let mut head = Head {
        length: blank + 4,
        content_length: 0,
        target: String::new(),
        close: false,
    };
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().map_err(|_| "bad Content-Length")?;
        } else if name.eq_ignore_ascii_case("x-amz-target") {
            head.target = value.to_owned();
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked bodies are not supported; send Content-Length");
        }
    }
    Ok(Some(head))
}

async fn respond(stream: &mut TcpStream, status: u16, body: &[u8]) -> io::Result<()> {
    let reason = if status == 200 { "OK" } else { "Bad Request" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nx-amzn-RequestId: 00000000-0000-0000-0000-000000000000\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await
}

fn error_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::json!({"__type": code, "message": message})
        .to_string()
        .into_bytes()
}

/// Reads a PutRecords body of `length` bytes (its start already in `buffer`) and writes the
/// answer: every entry succeeds on its shard; 400 if the body is not a PutRecords body. `None`
/// when the connection ended first.
async fn put_records(
    state: &State,
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    length: usize,
    answer: &mut Vec<u8>,
) -> Option<u16> {
    state
        .counters
        .put_records_requests
        .fetch_add(1, Ordering::Relaxed);
    answer.extend_from_slice(b"{\"FailedRecordCount\":0,\"Records\":[");
    let mut scanner = Scanner::default();
    let mut first = true;
    let mut route = |hash: u128| {
        let shard = state.map.shard_for(hash).map_or("", |s| &s.shard_id);
        if !std::mem::take(&mut first) {
            answer.push(b',');
        }
        answer.extend_from_slice(b"{\"SequenceNumber\":\"1\",\"ShardId\":\"");
        answer.extend_from_slice(shard.as_bytes());
        answer.extend_from_slice(b"\"}");
    };
    let mut left = length;
    let mut problem = None;
    loop {
        let available = buffer.len().min(left);
        if problem.is_none() {
            match scanner.feed(&buffer[..available], &mut route) {
                // The whole body is here and a unit of it is still incomplete: it is cut short.
                Ok(used) if used < available && available == left => {
                    problem = Some("the PutRecords body ended early");
                }
                Ok(used) => {
                    buffer.drain(..used);
                    left -= used;
                }
                Err(bad) => problem = Some(bad),
            }
        }
        if problem.is_some() {
            // Skip the rest of the body, then refuse it.
            let skipped = buffer.len().min(left);
            buffer.drain(..skipped);
            left -= skipped;
        }
        if left == 0 {
            break;
        }
        if !read_more(stream, buffer).await {
            return None;
        }
    }
    let problem = problem.or_else(|| scanner.finish().err());
    if let Some(problem) = problem {
        answer.clear();
        answer.extend_from_slice(&error_body("SerializationException", problem));
        return Some(400);
    }
    state
        .counters
        .entries
        .fetch_add(scanner.entries as u64, Ordering::Relaxed);
    answer.extend_from_slice(b"]}");
    Some(200)
}

/// Why scanning stopped: the unit is not complete yet, or the body is malformed.
#[derive(Debug, PartialEq)]
enum Stop {
    More,
    Bad(&'static str),
}

impl From<&'static str> for Stop {
    fn from(problem: &'static str) -> Self {
        Stop::Bad(problem)
    }
}

/// Where a PutRecords body scan stands.
#[derive(Debug, Default, PartialEq, Clone, Copy)]
enum Place {
    /// Before the top-level `{`.
    #[default]
    Start,
    /// Among the top-level members.
    Members,
    /// Inside the `Records` array.
    Records,
    /// After the top-level `}`.
    End,
}

/// An incremental scan of a PutRecords body: fed the bytes as they arrive, it consumes whole
/// units (a member, an entry, a separator) and calls `route` with each entry's hash key (its
/// explicit hash key, else the MD5 of its partition key).
#[derive(Debug, Default)]
struct Scanner {
    place: Place,
    entries: usize,
    saw_records: bool,
}

impl Scanner {
    /// Scans what it can of `data` and returns how many bytes it consumed; the rest must be fed
    /// again, with more after it.
    fn feed(&mut self, data: &[u8], route: &mut impl FnMut(u128)) -> Result<usize, &'static str> {
        let mut done = 0;
        loop {
            let at = skip_space(data, done);
            let Some(&byte) = data.get(at) else {
                return Ok(at);
            };
            let step = match (self.place, byte) {
                (Place::Start, b'{') => {
                    self.place = Place::Members;
                    Ok(at + 1)
                }
                (Place::Members, b',') | (Place::Records, b',') => Ok(at + 1),
                (Place::Members, b'}') => {
                    self.place = Place::End;
                    Ok(at + 1)
                }
                (Place::Members, b'"') => self.member(data, at),
                (Place::Records, b']') => {
                    self.place = Place::Members;
                    Ok(at + 1)
                }
                (Place::Records, b'{') => entry(data, at).map(|(hash, end)| {
                    route(hash);
                    self.entries += 1;
                    end
                }),
                _ => Err(Stop::Bad("malformed PutRecords body")),
            };
            match step {
                Ok(end) => done = end,
                Err(Stop::More) => return Ok(done),
                Err(Stop::Bad(problem)) => return Err(problem),
            }
        }
    }

    /// A top-level member: `"Records": [` opens the array; any other member's value is a
    /// string (StreamName, StreamARN).
    fn member(&mut self, data: &[u8], at: usize) -> Result<usize, Stop> {
        let (name, after) = string(data, at)?;
        let at = expect(data, skip_space(data, after), b':')?;
        let at = skip_space(data, at);
        if name == b"Records" {
            let at = expect(data, at, b'[')?;
            self.place = Place::Records;
            self.saw_records = true;
            Ok(at)
        } else {
            string(data, at).map(|(_, end)| end)
        }
    }

    /// The body ended: it must have been whole.
    fn finish(&self) -> Result<(), &'static str> {
        match (self.place, self.saw_records) {
            (Place::End, true) => Ok(()),
            (Place::End, false) => Err("no Records"),
            _ => Err("the PutRecords body ended early"),
        }
    }
}

/// One entry object at `at`: its hash key and the index after it.
fn entry(data: &[u8], mut at: usize) -> Result<(u128, usize), Stop> {
    at = expect(data, at, b'{')?;
    let (mut key, mut ehk) = (None, None);
    loop {
        at = skip_space(data, at);
        match data.get(at) {
            None => return Err(Stop::More),
            Some(b'}') => {
                at += 1;
                break;
            }
            Some(b',') => at = skip_space(data, at + 1),
            _ => {}
        }
        let (name, after) = string(data, at)?;
        at = expect(data, skip_space(data, after), b':')?;
        let (value, after) = string(data, skip_space(data, at))?;
        at = after;
        match name {
            b"PartitionKey" => key = Some(value),
            b"ExplicitHashKey" => ehk = Some(value),
            _ => {}
        }
    }
    let hash = match (ehk, key) {
        (Some(ehk), _) => std::str::from_utf8(ehk)
            .ok()
            .and_then(parse_explicit_hash_key)
            .ok_or("ExplicitHashKey is not a decimal 128-bit number")?,
        (None, Some(key)) => partition_key_hash(&unescape(key)?),
        (None, None) => return Err(Stop::Bad("an entry has no PartitionKey")),
    };
    Ok((hash, at))
}

/// A JSON string starting at `at`: its raw (still escaped) bytes, and the index after it.
fn string(body: &[u8], at: usize) -> Result<(&[u8], usize), Stop> {
    let start = expect(body, at, b'"')?;
    let mut i = start;
    while let Some(found) = body
        .get(i..)
        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
    {
        i += found;
        if body[i] == b'"' {
            return Ok((&body[start..i], i + 1));
        }
        i += 2;
    }
    Err(Stop::More)
}

/// A raw JSON string's text; escapes (rare in partition keys) go through serde_json.
fn unescape(raw: &[u8]) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    if !raw.contains(&b'\\') {
        return std::str::from_utf8(raw)
            .map(std::borrow::Cow::Borrowed)
            .map_err(|_| "PartitionKey is not UTF-8");
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice::<String>(&quoted)
        .map(std::borrow::Cow::Owned)
        .map_err(|_| "PartitionKey has a bad escape")
}

fn skip_space(body: &[u8], mut at: usize) -> usize {
    while body.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

fn expect(body: &[u8], at: usize, byte: u8) -> Result<usize, Stop> {
    match body.get(at) {
        Some(&b) if b == byte => Ok(at + 1),
        Some(_) => Err(Stop::Bad("malformed request body")),
        None => Err(Stop::More),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// One page (up to 1,000 shards) from the position in `NextToken`.
fn list_shards(map: &ShardMap, body: &[u8], answer: &mut Vec<u8>) -> u16 {
    let from = find(body, b"\"NextToken\"")
        .and_then(|at| {
            let at = expect(body, skip_space(body, at + 11), b':').ok()?;
            let (token, _) = string(body, skip_space(body, at)).ok()?;
            std::str::from_utf8(token).ok()?.parse::<usize>().ok()
        })
        .unwrap_or(0)
        .min(map.len());
    let page: Vec<_> = map.shards()[from..]
        .iter()
        .take(1000)
        .map(|s| {
            serde_json::json!({
                "ShardId": &*s.shard_id,
                "HashKeyRange": {"StartingHashKey": s.start.to_string(), "EndingHashKey": s.end.to_string()},
                "SequenceNumberRange": {"StartingSequenceNumber": "0"},
            })
        })
        .collect();
    let next = from + page.len();
    let value = if next < map.len() {
        serde_json::json!({"Shards": page, "NextToken": next.to_string()})
    } else {
        serde_json::json!({"Shards": page})
    };
    answer.extend_from_slice(value.to_string().as_bytes());
    200
}

fn describe_stream_summary(map: &ShardMap, answer: &mut Vec<u8>) {
    let value = serde_json::json!({"StreamDescriptionSummary": {
        "StreamName": "perf",
        "StreamARN": "arn:aws:kinesis:us-east-1:000000000000:stream/perf",
        "StreamStatus": "ACTIVE",
        "StreamModeDetails": {"StreamMode": "PROVISIONED"},
        "RetentionPeriodHours": 24,
        "StreamCreationTimestamp": 0,
        "EnhancedMonitoring": [],
        "OpenShardCount": map.len(),
    }});
    answer.extend_from_slice(value.to_string().as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes, as a connection would, keeping what was not
    /// consumed; returns the hashes routed, or the problem.
    fn scan(body: &[u8], step: usize) -> Result<Vec<u128>, &'static str> {
        let mut scanner = Scanner::default();
        let mut hashes = Vec::new();
        let mut pending = Vec::new();
        for piece in body.chunks(step) {
            pending.extend_from_slice(piece);
            let used = scanner.feed(&pending, &mut |h| hashes.push(h))?;
            pending.drain(..used);
        }
        assert_eq!(scanner.entries, hashes.len());
        scanner.finish().map(|()| hashes)
    }

    #[test]
    fn scans_entries_whole_or_byte_by_byte() {
        let body = br#"{"Records":[{"Data":"AAE=","PartitionKey":"a\"b"},{"ExplicitHashKey":"5","Data":"","PartitionKey":"k"}],"StreamName":"s"}"#;
        for step in [1, 2, 7, body.len()] {
            assert_eq!(
                scan(body, step),
                Ok(vec![partition_key_hash("a\"b"), 5]),
                "step {step}"
            );
        }
        let spaced = br#"{ "StreamName" : "s", "Records" : [ { "PartitionKey" : "k" } ] }"#;
        assert_eq!(scan(spaced, 3).map(|h| h.len()), Ok(1));
        assert_eq!(scan(br#"{"Records":[]}"#, 1), Ok(vec![]));
        assert_eq!(
            scan(br#"{"Records":[{"Data":"x"}]}"#, 4),
            Err("an entry has no PartitionKey")
        );
        assert_eq!(
            scan(br#"{"Records":[{"PartitionKey":"k""#, 5),
            Err("the PutRecords body ended early")
        );
        assert_eq!(scan(br#"{"StreamName":"s"}"#, 5), Err("no Records"));
        assert!(scan(br#"{"Records":[{"PartitionKey":"k"}]]"#, 50).is_err());
    }
}
