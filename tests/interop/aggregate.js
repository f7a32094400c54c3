// Aggregates user records with the AWS Node library aws-kinesis-agg.
// stdin/stdout: as aggregate.py.
const agg = require('aws-kinesis-agg');

const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const records = input.map((r) => {
  const record = { partitionKey: r.partition_key, data: Buffer.from(r.data, 'base64') };
  if (r.explicit_hash_key !== null && r.explicit_hash_key !== undefined) {
    record.explicitHashKey = r.explicit_hash_key;
  }
  return record;
});
const out = [];
agg.aggregate(
  records,
  (encoded, done) => {
    out.push({
      partition_key: encoded.partitionKey,
      explicit_hash_key: encoded.ExplicitHashKey === undefined ? null : encoded.ExplicitHashKey,
      data: Buffer.from(encoded.data).toString('base64'),
    });
    done();
  },
  () => process.stdout.write(JSON.stringify(out)),
  (err) => {
    process.stderr.write(String(err) + '\n');
    process.exit(1);
  },
);
