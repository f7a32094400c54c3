"""Aggregates user records with the AWS Python library aws_kinesis_agg.

stdin: JSON list of {"partition_key": str, "explicit_hash_key": str|null, "data": base64}
stdout: JSON list of Kinesis records {"partition_key", "explicit_hash_key", "data" (base64)}
"""
import base64
import json
import sys

from aws_kinesis_agg.aggregator import RecordAggregator

aggregator = RecordAggregator()
out = []


def emit(agg):
    if agg is None or agg.get_num_user_records() == 0:
        return
    pk, ehk, data = agg.get_contents()
    out.append({"partition_key": pk, "explicit_hash_key": ehk, "data": base64.b64encode(data).decode()})


for r in json.load(sys.stdin):
    emit(aggregator.add_user_record(r["partition_key"], base64.b64decode(r["data"]), r.get("explicit_hash_key")))
emit(aggregator.clear_and_get())
json.dump(out, sys.stdout)
