"""De-aggregates Kinesis records with the AWS Python library aws_kinesis_agg.

stdin: JSON list of {"data": base64, "partition_key": str, "sequence_number": str}
stdout: JSON list of user records {"partition_key", "explicit_hash_key", "data" (base64),
        "sub_sequence_number" (null for a record passed through), "sequence_number"}
"""
import base64
import json
import sys

from aws_kinesis_agg.deaggregator import iter_deaggregate_records

records = [
    {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "data": r["data"],
            "partitionKey": r["partition_key"],
            "sequenceNumber": r["sequence_number"],
            "approximateArrivalTimestamp": 0,
        }
    }
    for r in json.load(sys.stdin)
]
out = []
for user in iter_deaggregate_records(records):
    k = user["kinesis"]
    data = k["data"]
    out.append(
        {
            "partition_key": k["partitionKey"],
            "explicit_hash_key": k.get("explicitHashKey"),
            "data": data.decode() if isinstance(data, bytes) else data,
            "sub_sequence_number": k.get("subSequenceNumber"),
            "sequence_number": k["sequenceNumber"],
        }
    )
json.dump(out, sys.stdout)
