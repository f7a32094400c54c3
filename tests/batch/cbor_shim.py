"""CloudWatch's Smithy RPC v2 CBOR protocol in front of moto, which speaks only JSON 1.0 for it.

The Rust CloudWatch client sends `POST /service/GraniteServiceVersion20100801/operation/<Op>`
with a CBOR body. This shim decodes it, forwards it to moto as the same operation in AWS JSON 1.0,
and encodes moto's answer (or error) back into CBOR, timestamps as CBOR epoch times (tag 1).

Usage: cbor_shim.py PORT UPSTREAM   (listens on 127.0.0.1:PORT)
"""
import base64
import datetime
import gzip
import json
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cbor2

UPSTREAM = sys.argv[2]
TIMESTAMP_KEYS = {"Timestamp", "Timestamps", "StartTime", "EndTime"}


def to_json(value):
    """CBOR-decoded values as JSON 1.0 wants them: epoch seconds, base64 blobs."""
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def epoch(value):
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value, tz=datetime.timezone.utc)
    if isinstance(value, str):
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value


def to_cbor(value, key=None):
    """moto's JSON answer with its timestamps made datetimes again, for CBOR tag 1."""
    if isinstance(value, dict):
        return {k: to_cbor(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cbor(v, key) for v in value]
    if key in TIMESTAMP_KEYS:
        return epoch(value)
    return value


class Shim(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        # The SDK gzips large PutMetricData bodies (request compression).
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        parts = self.path.split("/")
        if len(parts) < 5 or parts[1] != "service" or parts[3] != "operation":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        service, operation = parts[2], parts[4]
        payload = json.dumps(to_json(cbor2.loads(body)) if body else {}).encode()
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower()
            not in ("content-type", "content-length", "content-encoding", "smithy-protocol", "accept", "host")
        }
        headers["Content-Type"] = "application/x-amz-json-1.0"
        headers["X-Amz-Target"] = f"{service}.{operation}"
        request = urllib.request.Request(UPSTREAM + "/", data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request) as answer:
                status, raw = answer.status, answer.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        document = json.loads(raw) if raw.strip() else {}
        if status >= 400 and "__type" in document:
            document["__type"] = document["__type"].split("#")[-1]
        out = cbor2.dumps(to_cbor(document), datetime_as_timestamp=True, timezone=datetime.timezone.utc)
        self.send_response(status)
        self.send_header("Content-Type", "application/cbor")
        self.send_header("smithy-protocol", "rpc-v2-cbor")
        if status >= 400 and "__type" in document:
            self.send_header("x-amzn-query-error", document["__type"] + ";Sender")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Shim).serve_forever()
