"""Peer: the AWS Python aggregation library (aws_kinesis_agg) with boto3 PutRecords.

usage: python_agg.py ENDPOINT RECORDS RECORD_SIZE

Aggregates RECORDS records of RECORD_SIZE bytes, each with a random UUID partition key, and sends
the aggregates with PutRecords (up to 500 entries or 5 MiB per request, one request at a time:
boto3 is synchronous). Prints key=value lines; CPU is this process's user + system time from the
first record to the last answer.
"""
import resource
import sys
import time
import uuid

import boto3
from aws_kinesis_agg.aggregator import RecordAggregator


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


endpoint, records, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = boto3.client(
    "kinesis",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="perf",
    aws_secret_access_key="perf",
)
data = bytes(ord("a") + i % 26 for i in range(size))
batch, batch_bytes = [], 0
stats = {"requests": 0, "kinesis_records": 0}


def send():
    global batch, batch_bytes
    if batch:
        answer = client.put_records(StreamName="perf", Records=batch)
        if answer["FailedRecordCount"]:
            sys.exit("the sink refused entries")
        stats["requests"] += 1
        stats["kinesis_records"] += len(batch)
    batch, batch_bytes = [], 0


def add(aggregate):
    global batch_bytes
    if aggregate is None or aggregate.get_num_user_records() == 0:
        return
    key, hash_key, blob = aggregate.get_contents()
    if len(batch) == 500 or batch_bytes + len(blob) + len(key) > 5 << 20:
        send()
    entry = {"Data": blob, "PartitionKey": key}
    if hash_key is not None:
        entry["ExplicitHashKey"] = hash_key
    batch.append(entry)
    batch_bytes += len(blob) + len(key)


aggregator = RecordAggregator()
cpu_before, started = cpu_seconds(), time.monotonic()
for _ in range(records):
    add(aggregator.add_user_record(str(uuid.uuid4()), data))
add(aggregator.clear_and_get())
send()
wall, cpu = time.monotonic() - started, cpu_seconds() - cpu_before
print(f"records={records}")
print(f"wall_seconds={wall:.3f}")
print(f"cpu_seconds={cpu:.3f}")
print(f"cpu_ns_per_record={cpu * 1e9 / records:.0f}")
print(f"records_per_second={records / wall:.0f}")
print(f"kinesis_records={stats['kinesis_records']}")
print(f"requests={stats['requests']}")
