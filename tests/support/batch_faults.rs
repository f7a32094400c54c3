//! An HTTP fault layer between the real AWS SDK clients and a real local server (moto), for the
//! batch helpers' tests: partial failures and whole-request faults are injected on the wire, so
//! the helpers meet the bytes an AWS endpoint would send, never a mock.
//!
//! A test-supplied rule sees every request and answers with a [`Plan`]. The per-service builders
//! (`sqs_fail`, `dynamodb_write_fail`, ...) make the plans for partial failures: they take the
//! picked entries out of the request, forward the rest, and add failures for the picked ones to
//! the server's answer in that service's own format.
//!
//! It speaks just enough HTTP/1.1 to sit in the middle: keep-alive on both sides, Content-Length
//! and chunked bodies (always forwarded with a Content-Length), `Expect: 100-continue`, and
//! answers that end when the server closes the connection.
#![allow(dead_code)]

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One request from the client, as the rule sees it; a chunked body is already de-chunked.
pub struct Request {
    pub method: String,
    /// The request target, query included.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The operation: from `X-Amz-Target` for the JSON protocols, `DeleteObjects` for S3's
    /// `POST /bucket?delete`, the last segment of `/service/<svc>/operation/<Op>` for CBOR.
    pub fn operation(&self) -> Option<String> {
        if let Some(target) = self.header("x-amz-target") {
            return target.rsplit_once('.').map(|(_, op)| op.to_owned());
        }
        let (path, query) = self.path.split_once('?').unwrap_or((&self.path, ""));
        if self.is_cbor() {
            let (_, op) = path.rsplit_once("/operation/")?;
            return Some(op.to_owned());
        }
        let delete = query
            .split('&')
            .any(|p| p.split('=').next() == Some("delete"));
        (self.method == "POST" && delete).then(|| "DeleteObjects".to_owned())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    fn is_cbor(&self) -> bool {
        self.header("smithy-protocol") == Some("rpc-v2-cbor")
    }
}

/// What the proxy does with one request.
pub enum Plan {
    /// Forward unchanged, answer unchanged.
    Pass,
    /// Answer at once with this status and error code, in the request's protocol, without
    /// forwarding.
    Refuse { status: u16, code: String },
    /// Answer at once with this body, without forwarding: the builders' answer when every entry
    /// of a batch fails, since nothing is left to send.
    Answer {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
    /// Reset the connection before forwarding (nothing reached the server).
    ResetBefore,
    /// Forward, then reset the connection instead of answering (the server applied the request;
    /// the client cannot know).
    ResetAfter,
    /// Forward, then hold the answer this long before sending it.
    Delay(Duration),
    /// Forward `body` instead of the request's body, then pass the answer's body through `patch`
    /// (an answer with status >= 300 is returned unpatched).
    Rewrite {
        body: Vec<u8>,
        patch: Box<dyn FnOnce(Vec<u8>) -> Vec<u8> + Send>,
    },
}

pub struct BatchFaultProxy {
    /// `http://127.0.0.1:PORT`, the endpoint to give the SDK client.
    pub endpoint: String,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    /// `127.0.0.1:N`, without the scheme.
    upstream: String,
    rule: Box<dyn Fn(&Request) -> Plan + Send + Sync>,
    requests: AtomicU64,
    faulted: AtomicU64,
}

impl BatchFaultProxy {
    /// Starts on 127.0.0.1:0 in front of `upstream` (`http://127.0.0.1:N`); `rule` is asked
    /// about every request.
    pub async fn start(
        upstream: &str,
        rule: impl Fn(&Request) -> Plan + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let shared = Arc::new(Shared {
            upstream: upstream.trim_start_matches("http://").to_owned(),
            rule: Box::new(rule),
            requests: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
        });
        let serving = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(Arc::clone(&serving), BufReader::new(client)));
            }
        });
        BatchFaultProxy {
            endpoint,
            shared,
            accept,
        }
    }

    /// Requests seen so far, faulted or not.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Requests the rule answered with anything but [`Plan::Pass`].
    pub fn faulted(&self) -> u64 {
        self.shared.faulted.load(Ordering::SeqCst)
    }
}

impl Drop for BatchFaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A connection, read through a buffer so that heads can be read line by line.
type Connection = BufReader<TcpStream>;

async fn serve(shared: Arc<Shared>, mut client: Connection) {
    // Connected at the first request forwarded, and again whenever the server closed it.
    let mut upstream: Option<Connection> = None;
    while let Some(request) = read_request(&mut client).await {
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let plan = (shared.rule)(&request);
        if !matches!(plan, Plan::Pass) {
            shared.faulted.fetch_add(1, Ordering::SeqCst);
        }
        let upstream = &mut upstream;
        let response = match plan {
            Plan::Pass => forward(&shared, upstream, &request, &request.body).await,
            Plan::Refuse { status, code } => Some(refusal(&request, status, &code)),
            Plan::Answer {
                status,
                content_type,
                body,
            } => Some(Response::new(
                status,
                &[("content-type", &content_type)],
                body,
            )),
            Plan::ResetBefore => None,
            Plan::ResetAfter => {
                let _ = forward(&shared, upstream, &request, &request.body).await;
                None
            }
            Plan::Delay(delay) => {
                let response = forward(&shared, upstream, &request, &request.body).await;
                tokio::time::sleep(delay).await;
                response
            }
            Plan::Rewrite { body, patch } => forward(&shared, upstream, &request, &body)
                .await
                .map(|response| response.patched(patch)),
        };
        // No answer (a reset plan, or the server unreachable): the client sees a reset.
        let Some(response) = response else {
            let _ = client.get_ref().set_zero_linger();
            return;
        };
        let answer = response.encode();
        if client.get_mut().write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Reads one request, or `None` when the client closed the connection (or sent garbage).
async fn read_request(client: &mut Connection) -> Option<Request> {
    let (start_line, headers) = read_head(client).await?;
    let mut parts = start_line.split(' ');
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let framing = framing(&headers, Framing::Length(0));
    // The client waits for this before sending the body; the header is not forwarded.
    let expect = header(&headers, "expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
    if expect && !matches!(framing, Framing::Length(0)) {
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        client.get_mut().write_all(interim).await.ok()?;
    }
    let body = read_body(client, framing).await?;
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

/// Sends `request` with `body` to the server and reads its answer; `None` if the server is
/// unreachable or hung up before answering in full.
async fn forward(
    shared: &Shared,
    upstream: &mut Option<Connection>,
    request: &Request,
    body: &[u8],
) -> Option<Response> {
    if !upstream.as_ref().is_some_and(still_open) {
        let server = TcpStream::connect(&shared.upstream).await.ok()?;
        *upstream = Some(BufReader::new(server));
    }
    let server = upstream.as_mut()?;
    let start_line = format!("{} {} HTTP/1.1", request.method, request.path);
    let message = encode(&start_line, &request.headers, Some(body));
    server.get_mut().write_all(&message).await.ok()?;
    let (start_line, headers) = read_head(server).await?;
    let status = status_of(&start_line)?;
    let framing = framing(&headers, Framing::UntilClose);
    let close = matches!(framing, Framing::UntilClose)
        || header(&headers, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
    let body = if request.method == "HEAD" || status == 204 || status == 304 {
        None
    } else {
        Some(read_body(server, framing).await?)
    };
    if close {
        *upstream = None;
    }
    Some(Response {
        start_line,
        headers,
        body,
    })
}

/// Whether a kept-alive connection can take another request: the server may have closed it
/// while idle, and a request written into a closed connection would be lost.
fn still_open(connection: &Connection) -> bool {
    let mut probe = [0u8; 1];
    let read = connection.get_ref().try_read(&mut probe);
    matches!(read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// One HTTP/1.1 answer to the client.
struct Response {
    start_line: String,
    headers: Vec<(String, String)>,
    /// `None` for answers without a body by definition (to HEAD, 204, 304): their framing
    /// headers describe the resource and pass unchanged.
    body: Option<Vec<u8>>,
}

impl Response {
    fn new(status: u16, headers: &[(&str, &str)], body: Vec<u8>) -> Self {
        let headers = headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()));
        Response {
            start_line: format!("HTTP/1.1 {status} Injected"),
            headers: headers.collect(),
            body: Some(body),
        }
    }

    fn patched(mut self, patch: Box<dyn FnOnce(Vec<u8>) -> Vec<u8> + Send>) -> Self {
        if status_of(&self.start_line).is_some_and(|s| s < 300) {
            self.body = self.body.map(patch);
            // DynamoDB's checksum of the body, stale once the body changed.
            self.headers
                .retain(|(name, _)| !name.eq_ignore_ascii_case("x-amz-crc32"));
        }
        self
    }

    fn encode(&self) -> Vec<u8> {
        encode(&self.start_line, &self.headers, self.body.as_deref())
    }
}

/// A message framed by Content-Length. The hop-by-hop and framing headers of the original are
/// dropped: the proxy de-chunks bodies and keeps each side's connection on its own terms.
fn encode(start_line: &str, headers: &[(String, String)], body: Option<&[u8]>) -> Vec<u8> {
    let mut dropped = vec!["connection", "keep-alive", "expect"];
    if body.is_some() {
        dropped.extend(["content-length", "transfer-encoding"]);
    }
    let mut head = format!("{start_line}\r\n");
    for (name, value) in headers {
        if !dropped.iter().any(|d| name.eq_ignore_ascii_case(d)) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    if let Some(body) = body {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    [head.as_bytes(), body.unwrap_or_default()].concat()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

fn status_of(start_line: &str) -> Option<u16> {
    start_line.split(' ').nth(1)?.parse().ok()
}

/// How a message's body is delimited.
enum Framing {
    Length(usize),
    Chunked,
    /// An answer with neither length nor chunking ends when the server closes.
    UntilClose,
}

fn framing(headers: &[(String, String)], without_length: Framing) -> Framing {
    let encoding = header(headers, "transfer-encoding").unwrap_or_default();
    if encoding.to_ascii_lowercase().contains("chunked") {
        return Framing::Chunked;
    }
    match header(headers, "content-length").map(str::parse) {
        Some(Ok(length)) => Framing::Length(length),
        _ => without_length,
    }
}

/// One line without its line end, or `None` at the end of the stream.
async fn read_line(connection: &mut Connection) -> Option<String> {
    let mut line = Vec::new();
    match connection.read_until(b'\n', &mut line).await {
        Ok(n) if n > 0 => Some(String::from_utf8_lossy(&line).trim_end().to_owned()),
        _ => None,
    }
}

/// The start line and headers, or `None` when the peer closed the connection.
async fn read_head(connection: &mut Connection) -> Option<(String, Vec<(String, String)>)> {
    let start_line = read_line(connection).await?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(connection).await?;
        if line.is_empty() {
            return Some((start_line, headers));
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
}

async fn read_body(connection: &mut Connection, framing: Framing) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    match framing {
        Framing::Length(length) => {
            body.resize(length, 0);
            connection.read_exact(&mut body).await.ok()?;
        }
        Framing::UntilClose => {
            connection.read_to_end(&mut body).await.ok()?;
        }
        Framing::Chunked => loop {
            let line = read_line(connection).await?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).ok()?;
            if size == 0 {
                // Trailers, up to the empty line: dropped with the chunking.
                while !read_line(connection).await?.is_empty() {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            connection.read_exact(&mut body[start..]).await.ok()?;
            read_line(connection).await?;
        },
    }
    Some(body)
}

/// An error answer in the request's protocol, so that the SDK parses the code as it would parse
/// AWS's. `x-amzn-query-error` carries the code for the services that kept their old query
/// protocol's codes (SQS, CloudWatch); the others ignore it.
fn refusal(request: &Request, status: u16, code: &str) -> Response {
    let query_error = format!("{code};Sender");
    let json_type = match request.header("content-type") {
        Some(content_type) if content_type.contains("amz-json") => Some(content_type),
        _ => (request.header("x-amz-target")).map(|_| "application/x-amz-json-1.0"),
    };
    if request.is_cbor() {
        let mut body = vec![0xA2]; // A map of two pairs.
        for text in ["__type", code, "message", "injected"] {
            cbor_text(&mut body, text);
        }
        let headers = [
            ("smithy-protocol", "rpc-v2-cbor"),
            ("content-type", "application/cbor"),
            ("x-amzn-query-error", &query_error),
        ];
        Response::new(status, &headers, body)
    } else if let Some(content_type) = json_type {
        let body = json!({"__type": code, "message": "injected"}).to_string();
        let headers = [
            ("content-type", content_type),
            ("x-amzn-errortype", code),
            ("x-amzn-query-error", &query_error),
        ];
        Response::new(status, &headers, body.into_bytes())
    } else {
        let body = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>{}</Code><Message>injected</Message><RequestId>1</RequestId></Error>"#,
            xml_escape(code)
        );
        let headers = [("content-type", "application/xml")];
        Response::new(status, &headers, body.into_bytes())
    }
}

/// Appends a CBOR text string (major type 3): its length in the initial byte when it fits in
/// five bits, else in the 1, 2, 4 or 8 bytes that follow.
fn cbor_text(out: &mut Vec<u8>, text: &str) {
    let length = text.len() as u64;
    let (initial, width) = match length {
        0..=23 => (0x60 | length as u8, 0),
        24..=0xFF => (0x78, 1),
        0x100..=0xFFFF => (0x79, 2),
        0x1_0000..=0xFFFF_FFFF => (0x7A, 4),
        _ => (0x7B, 8),
    };
    out.push(initial);
    out.extend_from_slice(&length.to_be_bytes()[8 - width..]);
    out.extend_from_slice(text.as_bytes());
}

/// SQS SendMessageBatch: the picked entries fail with their code and sender-fault flag, in
/// `Failed`.
pub fn sqs_fail(req: &Request, pick: impl Fn(usize, &Value) -> Option<(String, bool)>) -> Plan {
    let mut request = req.json().unwrap_or_default();
    let Value::Array(entries) = take(&mut request, "Entries") else {
        return Plan::Pass;
    };
    let (mut kept, mut failed) = (Vec::new(), Vec::new());
    for (position, entry) in entries.into_iter().enumerate() {
        match pick(position, &entry) {
            Some((code, sender_fault)) => failed.push(json!({
                "Id": entry.get("Id"),
                "SenderFault": sender_fault,
                "Code": code,
                "Message": "injected",
            })),
            None => kept.push(entry),
        }
    }
    let (picked, left) = (!failed.is_empty(), !kept.is_empty());
    put(&mut request, "Entries", kept);
    let failures = json!({ "Failed": failed });
    let nothing_sent = json!({ "Successful": [] });
    json_plan(req, request, picked, left, nothing_sent, |answer| {
        merge(answer, failures)
    })
}

/// DynamoDB BatchWriteItem: the picked write requests come back in `UnprocessedItems`. `pick`
/// gets each one's position across all tables, its table, and the WriteRequest.
pub fn dynamodb_write_fail(req: &Request, pick: impl Fn(usize, &str, &Value) -> bool) -> Plan {
    dynamodb_fail(req, "", "UnprocessedItems", json!({}), pick, |item| item)
}

/// [`dynamodb_write_fail`], with each picked write request written back in `UnprocessedItems`
/// as `echo` rewrites it (as a service that normalises what it echoes would).
pub fn dynamodb_write_fail_echoing(
    req: &Request,
    pick: impl Fn(usize, &str, &Value) -> bool,
    echo: impl Fn(Value) -> Value,
) -> Plan {
    dynamodb_fail(req, "", "UnprocessedItems", json!({}), pick, echo)
}

/// DynamoDB BatchGetItem: the picked keys come back in `UnprocessedKeys`, with the same
/// `ConsistentRead`, `ProjectionExpression`... as their table's entry in the request.
pub fn dynamodb_get_fail(req: &Request, pick: impl Fn(usize, &str, &Value) -> bool) -> Plan {
    let nothing_sent = json!({ "Responses": {} });
    dynamodb_fail(req, "/Keys", "UnprocessedKeys", nothing_sent, pick, |key| {
        key
    })
}

/// Both DynamoDB batches map each table to its entry: the list of items itself for writes, an
/// object holding the list (at the JSON pointer `list`) and its options for gets.
fn dynamodb_fail(
    req: &Request,
    list: &str,
    unprocessed: &str,
    nothing_sent: Value,
    pick: impl Fn(usize, &str, &Value) -> bool,
    echo: impl Fn(Value) -> Value,
) -> Plan {
    let mut request = req.json().unwrap_or_default();
    let Value::Object(tables) = take(&mut request, "RequestItems") else {
        return Plan::Pass;
    };
    let (mut kept, mut picked) = (Map::new(), Map::new());
    let mut position = 0;
    for (table, mut entry) in tables {
        let Some(Value::Array(items)) = entry.pointer_mut(list).map(Value::take) else {
            return Plan::Pass;
        };
        let (chosen, rest): (Vec<Value>, Vec<Value>) = items.into_iter().partition(|item| {
            position += 1;
            pick(position - 1, &table, item)
        });
        let chosen: Vec<Value> = chosen.into_iter().map(&echo).collect();
        for (part, into) in [(rest, &mut kept), (chosen, &mut picked)] {
            if !part.is_empty() {
                let mut half = entry.clone();
                if let Some(slot) = half.pointer_mut(list) {
                    *slot = part.into();
                }
                into.insert(table.clone(), half);
            }
        }
    }
    let (any_picked, left) = (!picked.is_empty(), !kept.is_empty());
    put(&mut request, "RequestItems", kept);
    let failures = Value::Object(Map::from_iter([(unprocessed.to_owned(), picked.into())]));
    json_plan(req, request, any_picked, left, nothing_sent, |answer| {
        merge(answer, failures)
    })
}

/// Firehose PutRecordBatch: the picked records fail with their code, at their own position in
/// `RequestResponses`.
pub fn firehose_fail(req: &Request, pick: impl Fn(usize, &Value) -> Option<String>) -> Plan {
    let (responses, count) = ("RequestResponses", "FailedPutCount");
    positional_fail(req, responses, count, json!({ "Encrypted": false }), pick)
}

/// Kinesis PutRecords: the picked records fail with their code, at their own position in
/// `Records`.
pub fn kinesis_fail(req: &Request, pick: impl Fn(usize, &Value) -> Option<String>) -> Plan {
    positional_fail(req, "Records", "FailedRecordCount", json!({}), pick)
}

/// Firehose and Kinesis answer with one response per request record, in the request's order, so
/// the picked records' failures are spliced in at the positions the forwarded request no longer
/// has, between the server's responses to the others.
fn positional_fail(
    req: &Request,
    responses: &'static str,
    failed_count: &'static str,
    nothing_sent: Value,
    pick: impl Fn(usize, &Value) -> Option<String>,
) -> Plan {
    let mut request = req.json().unwrap_or_default();
    let Value::Array(records) = take(&mut request, "Records") else {
        return Plan::Pass;
    };
    let failures: Vec<Option<Value>> = (records.iter().enumerate())
        .map(|(position, record)| {
            let code = pick(position, record)?;
            Some(json!({ "ErrorCode": code, "ErrorMessage": "injected" }))
        })
        .collect();
    let kept: Vec<Value> = (records.into_iter().zip(&failures))
        .filter_map(|(record, failure)| failure.is_none().then_some(record))
        .collect();
    let (picked, left) = (kept.len() < failures.len(), !kept.is_empty());
    put(&mut request, "Records", kept);
    json_plan(req, request, picked, left, nothing_sent, move |answer| {
        let served = answer.get(responses).and_then(Value::as_array);
        let mut served = served.cloned().unwrap_or_default().into_iter();
        // `None`, and the answer left as it is, if the server answered fewer records than sent.
        let spliced: Option<Vec<Value>> = (failures.into_iter())
            .map(|failure| failure.or_else(|| served.next()))
            .collect();
        if let Some(spliced) = spliced {
            let count = spliced
                .iter()
                .filter(|r| r.get("ErrorCode").is_some())
                .count();
            put(answer, failed_count, count);
            put(answer, responses, spliced);
        }
    })
}

/// The plan for a JSON batch whose picked entries were taken out of `request`, with `patch`
/// adding their failures to an answer: with none picked, pass; with none left, answer at once
/// with `nothing_sent` (the server's answer to an empty batch) patched; else forward the rest
/// and patch the server's answer.
fn json_plan(
    req: &Request,
    request: Value,
    picked: bool,
    left: bool,
    nothing_sent: Value,
    patch: impl FnOnce(&mut Value) + Send + 'static,
) -> Plan {
    if !picked {
        return Plan::Pass;
    }
    if !left {
        let mut answer = nothing_sent;
        patch(&mut answer);
        let content_type = req
            .header("content-type")
            .unwrap_or("application/x-amz-json-1.0");
        return Plan::Answer {
            status: 200,
            content_type: content_type.to_owned(),
            body: answer.to_string().into_bytes(),
        };
    }
    Plan::Rewrite {
        body: request.to_string().into_bytes(),
        patch: Box::new(|answer| match serde_json::from_slice::<Value>(&answer) {
            Ok(mut json) => {
                patch(&mut json);
                json.to_string().into_bytes()
            }
            Err(_) => answer,
        }),
    }
}

/// The value under `key`, taken out of the object `value` (`Null` if there is none).
fn take(value: &mut Value, key: &str) -> Value {
    value.get_mut(key).map(Value::take).unwrap_or_default()
}

/// Sets `key` in the object `value` (nothing if `value` is no object).
fn put(value: &mut Value, key: &str, item: impl Into<Value>) {
    if let Some(object) = value.as_object_mut() {
        object.insert(key.to_owned(), item.into());
    }
}

/// Adds `addition` to `target`: arrays are extended, objects merged key by key, and anything
/// else takes the place of what was there (a missing or null `UnprocessedItems`, say).
fn merge(target: &mut Value, addition: Value) {
    match (target, addition) {
        (Value::Array(items), Value::Array(more)) => items.extend(more),
        (Value::Object(object), Value::Object(more)) => {
            for (key, value) in more {
                merge(object.entry(key).or_insert(Value::Null), value);
            }
        }
        (target, addition) => *target = addition,
    }
}

/// An object's key and version id, unescaped.
type ObjectId = (String, Option<String>);

/// S3 DeleteObjects: the picked objects get an `<Error>` with their code in the answer. The
/// request is forwarded unchanged, since the client's checksum header covers its body: the
/// picked objects are in fact deleted, and their `<Deleted>` entries are taken out of the
/// answer (retrying a delete is harmless). `pick` gets the unescaped key and version id.
pub fn s3_delete_fail(
    req: &Request,
    pick: impl Fn(usize, &str, Option<&str>) -> Option<String>,
) -> Plan {
    let Ok(body) = std::str::from_utf8(&req.body) else {
        return Plan::Pass;
    };
    let mut failures = Vec::new();
    for (position, (_, object)) in xml_elements(body, "Object").into_iter().enumerate() {
        let Some((key, version_id)) = object_id(object) else {
            return Plan::Pass;
        };
        if let Some(code) = pick(position, &key, version_id.as_deref()) {
            failures.push(((key, version_id), code));
        }
    }
    if failures.is_empty() {
        return Plan::Pass;
    }
    Plan::Rewrite {
        body: req.body.clone(),
        patch: Box::new(move |answer| match String::from_utf8(answer) {
            Ok(xml) => splice_delete_errors(xml, &failures).into_bytes(),
            Err(not_text) => not_text.into_bytes(),
        }),
    }
}

/// S3 DeleteObjects, forwarded unchanged, its answer's `<Deleted>` entries put in reverse order
/// (S3 does not promise the request's order).
pub fn s3_reverse_deleted(req: &Request) -> Plan {
    Plan::Rewrite {
        body: req.body.clone(),
        patch: Box::new(|answer| match String::from_utf8(answer) {
            Ok(xml) => {
                let deleted = xml_elements(&xml, "Deleted");
                let (Some(first), Some(last)) = (deleted.first(), deleted.last()) else {
                    return xml.into_bytes();
                };
                let span = first.0.start..last.0.end;
                let reversed: String = deleted
                    .iter()
                    .rev()
                    .map(|(range, _)| &xml[range.clone()])
                    .collect();
                let mut out = xml[..span.start].to_owned();
                out += &reversed;
                out += &xml[span.end..];
                out.into_bytes()
            }
            Err(not_text) => not_text.into_bytes(),
        }),
    }
}

/// The key and version id in the inner text of an `<Object>` or a `<Deleted>`.
fn object_id(inner: &str) -> Option<ObjectId> {
    let key = xml_unescape(xml_text(inner, "Key")?);
    let version_id = xml_text(inner, "VersionId").map(|v| xml_unescape(v.trim()));
    Some((key, version_id))
}

/// The DeleteResult `xml` without the failed objects' `<Deleted>` entries (matched by key, and
/// by version id when the request gave one) and with an `<Error>` for each; `xml` as it is if
/// it is no DeleteResult.
fn splice_delete_errors(xml: String, failures: &[(ObjectId, String)]) -> String {
    let mut deleted: Vec<(Range<usize>, Option<ObjectId>)> = xml_elements(&xml, "Deleted")
        .into_iter()
        .map(|(range, inner)| (range, object_id(inner)))
        .collect();
    let (mut removed, mut errors) = (Vec::new(), String::new());
    for ((key, version_id), code) in failures {
        let same = |id: &Option<ObjectId>| {
            id.as_ref()
                .is_some_and(|(k, v)| k == key && (version_id.is_none() || v == version_id))
        };
        if let Some(index) = deleted.iter().position(|(_, id)| same(id)) {
            removed.push(deleted.remove(index).0);
        }
        let version = version_id.as_deref().map(xml_escape);
        let version = version
            .map(|v| format!("<VersionId>{v}</VersionId>"))
            .unwrap_or_default();
        let (key, code) = (xml_escape(key), xml_escape(code));
        errors += &format!("<Error><Key>{key}</Key>{version}<Code>{code}</Code>");
        errors += "<Message>injected</Message></Error>";
    }
    removed.sort_by_key(|range| range.start);
    let (mut kept, mut from) = (String::new(), 0);
    for range in removed {
        kept += &xml[from..range.start];
        from = range.end;
    }
    kept += &xml[from..];
    if let Some(end) = kept.rfind("</DeleteResult>") {
        kept.insert_str(end, &errors);
        return kept;
    }
    // Quiet mode with nothing to report: an empty `<DeleteResult .../>`.
    let Some((range, _)) = xml_elements(&kept, "DeleteResult").into_iter().next() else {
        return xml;
    };
    let open = kept[range.clone()].trim_end_matches("/>");
    let (before, after) = (&kept[..range.start], &kept[range.end..]);
    format!("{before}{open}>{errors}</DeleteResult>{after}")
}

/// Every `<tag ...>inner</tag>` (or empty `<tag .../>`) in `xml`, as the element's byte range
/// and its inner text; for flat documents like S3's, where no element contains its own tag.
fn xml_elements<'a>(xml: &'a str, tag: &str) -> Vec<(Range<usize>, &'a str)> {
    let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(start) = xml[from..].find(&open).map(|at| from + at) {
        let name_end = start + open.len();
        let Some(open_end) = xml[name_end..].find('>').map(|at| name_end + at + 1) else {
            break;
        };
        let attributes = &xml[name_end..open_end - 1];
        from = open_end;
        // `<Key` also starts `<KeyMarker>`: the name must end here.
        if attributes.starts_with(|c: char| c.is_alphanumeric() || c == '_' || c == '-') {
            from = name_end;
        } else if attributes.ends_with('/') {
            found.push((start..open_end, ""));
        } else if let Some(inner_end) = xml[open_end..].find(&close).map(|at| open_end + at) {
            from = inner_end + close.len();
            found.push((start..from, &xml[open_end..inner_end]));
        }
    }
    found
}

/// The inner text of the first `<tag>` in `xml`.
fn xml_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    xml_elements(xml, tag).first().map(|(_, inner)| *inner)
}

/// XML's five named entities, with the characters they stand for.
const ENTITIES: [(char, &str); 5] = [
    ('&', "amp"),
    ('<', "lt"),
    ('>', "gt"),
    ('"', "quot"),
    ('\'', "apos"),
];

/// Text as XML character data: the markup characters as entities, and control characters
/// (which S3 keys may hold) as character references.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match ENTITIES.iter().find(|(plain, _)| *plain == c) {
            Some((_, name)) => out.push_str(&format!("&{name};")),
            None if u32::from(c) < 0x20 => out.push_str(&format!("&#x{:X};", u32::from(c))),
            None => out.push(c),
        }
    }
    out
}

/// XML character data as text: the named entities and numeric character references; an `&`
/// that starts neither is kept as it is.
fn xml_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let reference = rest.find(';').and_then(|end| {
            let name = &rest[1..end];
            let named = ENTITIES.iter().find(|(_, n)| *n == name).map(|(c, _)| *c);
            let numeric = || {
                let number = name.strip_prefix('#')?;
                let code = match number.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => number.parse().ok()?,
                };
                char::from_u32(code)
            };
            Some((named.or_else(numeric)?, end + 1))
        });
        let (c, length) = reference.unwrap_or(('&', 1));
        out.push(c);
        rest = &rest[length..];
    }
    out.push_str(rest);
    out
}
