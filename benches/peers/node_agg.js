// Peer: the AWS Node aggregation library (aws-kinesis-agg) with the AWS SDK v3 Kinesis client.
//
// usage: node node_agg.js ENDPOINT RECORDS RECORD_SIZE
//
// Aggregates RECORDS records of RECORD_SIZE bytes, each with a random UUID partition key, and
// sends the aggregates with PutRecords (up to 500 entries or 5 MiB per request; the library hands
// over the next aggregate when the previous one is accepted into a batch, and a full batch is
// sent before it continues). Prints key=value lines; CPU is this process's user + system time
// from the first record to the last answer.
const { randomUUID } = require('crypto');
const agg = require('aws-kinesis-agg');
const { KinesisClient, PutRecordsCommand } = require('@aws-sdk/client-kinesis');
// The client speaks HTTP/2 by default (for SubscribeToShard); PutRecords goes over HTTP/1.1 as
// with every other peer, through the SDK's own HTTP/1.1 handler.
const { NodeHttpHandler } = require('@smithy/node-http-handler');

const [endpoint, records, size] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const client = new KinesisClient({
  endpoint,
  region: 'us-east-1',
  credentials: { accessKeyId: 'perf', secretAccessKey: 'perf' },
  requestHandler: new NodeHttpHandler(),
});
const data = Buffer.alloc(size);
for (let i = 0; i < size; i++) data[i] = 97 + (i % 26);

let batch = [];
let batchBytes = 0;
let requests = 0;
let kinesisRecords = 0;

async function send() {
  if (batch.length === 0) return;
  const answer = await client.send(new PutRecordsCommand({ StreamName: 'perf', Records: batch }));
  if (answer.FailedRecordCount) throw new Error('the sink refused entries');
  requests += 1;
  kinesisRecords += batch.length;
  batch = [];
  batchBytes = 0;
}

async function add(encoded) {
  const blob = Buffer.from(encoded.data);
  if (batch.length === 500 || batchBytes + blob.length + encoded.partitionKey.length > 5 << 20) {
    await send();
  }
  const entry = { Data: blob, PartitionKey: encoded.partitionKey };
  if (encoded.ExplicitHashKey !== undefined) entry.ExplicitHashKey = encoded.ExplicitHashKey;
  batch.push(entry);
  batchBytes += blob.length + encoded.partitionKey.length;
}

const cpuBefore = process.cpuUsage();
const started = process.hrtime.bigint();
const input = [];
for (let i = 0; i < records; i++) input.push({ partitionKey: randomUUID(), data });
agg.aggregate(
  input,
  (encoded, done) => {
    add(encoded).then(() => done(), (err) => done(err));
  },
  async () => {
    await send();
    const wall = Number(process.hrtime.bigint() - started) / 1e9;
    const used = process.cpuUsage(cpuBefore);
    const cpu = (used.user + used.system) / 1e6;
    console.log(`records=${records}`);
    console.log(`wall_seconds=${wall.toFixed(3)}`);
    console.log(`cpu_seconds=${cpu.toFixed(3)}`);
    console.log(`cpu_ns_per_record=${((cpu * 1e9) / records).toFixed(0)}`);
    console.log(`records_per_second=${(records / wall).toFixed(0)}`);
    console.log(`kinesis_records=${kinesisRecords}`);
    console.log(`requests=${requests}`);
  },
  (err) => {
    console.error(String(err));
    process.exit(1);
  },
);
