// De-aggregates Kinesis records with the AWS Node library aws-kinesis-agg (checksums on).
// stdin/stdout: as deaggregate.py; "error" is set for a Kinesis record the library refused.
const agg = require('aws-kinesis-agg');

const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const out = [];
for (const r of input) {
  const kinesisRecord = { data: r.data, partitionKey: r.partition_key, sequenceNumber: r.sequence_number };
  agg.deaggregateSync(kinesisRecord, true, (err, users) => {
    if (err) {
      out.push({ error: String(err), sequence_number: r.sequence_number });
      return;
    }
    for (const u of users) {
      const ehk = u.explicitPartitionKey;
      out.push({
        partition_key: u.partitionKey,
        explicit_hash_key: ehk === undefined || ehk === null ? null : String(ehk),
        data: u.data,
        sub_sequence_number: u.subSequenceNumber === undefined ? null : Number(u.subSequenceNumber),
        sequence_number: u.sequenceNumber,
      });
    }
  });
}
process.stdout.write(JSON.stringify(out));
