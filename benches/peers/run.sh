#!/usr/bin/env bash
# Runs each peer that installs from the registries, and our producer with aggregation on and
# off, against the same standalone null sink (`kinesis-producer perf-sink`), on the same
# workloads, and prints CPU ns per record and records/s for each, with each peer's CPU per
# record as a multiple of ours (aggregation on).
#
#   benches/peers/run.sh [--records N]      (default 200,000 records per run)
#
# Peers are installed here by this script, never copied into the repository: the Python ones
# into ./.venv (scripts/python-env.sh, pinned), the Node ones into benches/peers/node_modules
# (npm ci, pinned by package-lock.json). A CSV of the figures goes to target/peers/results.csv.
set -euo pipefail
cd "$(dirname "$0")/../.."
RECORDS=200000
while [ $# -gt 0 ]; do
  case "$1" in
    --records) RECORDS="$2"; shift 2 ;;
    *) echo "usage: $0 [--records N]" >&2; exit 2 ;;
  esac
done

source scripts/python-env.sh
(cd benches/peers && npm ci --silent --no-audit --no-fund >/dev/null)
# boto3-batch-utils (its Kinesis dispatcher, no aggregation) is measured when the registry
# has it; the registry this project is built against does not (pip finds no version).
if .venv/bin/python -c 'import boto3_batch_utils' 2>/dev/null \
  || .venv/bin/pip install --quiet boto3-batch-utils==3.0.0 >/dev/null 2>&1; then
  BATCH_UTILS=installed
else
  BATCH_UTILS="not installable: pip install boto3-batch-utils==3.0.0 finds no distribution in this registry"
fi
cargo build --release --quiet --bin kinesis-producer
BIN=target/release/kinesis-producer
OUT=target/peers
mkdir -p "$OUT"
CSV="$OUT/results.csv"
echo "workload,record_size,shards,peer,records,records_per_second,cpu_ns_per_record,peer_cpu_over_ours" > "$CSV"

SINK_PID=
stop_sink() { if [ -n "$SINK_PID" ]; then kill "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true; SINK_PID=; fi; }
trap stop_sink EXIT

# value KEY FILE: the value of KEY=... in FILE.
value() { sed -n "s/^$1=//p" "$2" | head -1; }

run_workload() {
  local name=$1 size=$2 shards=$3
  "$BIN" perf-sink --shards "$shards" > "$OUT/sink.out" &
  SINK_PID=$!
  for _ in $(seq 50); do grep -q '^endpoint=' "$OUT/sink.out" 2>/dev/null && break; sleep 0.1; done
  local endpoint
  endpoint=$(value endpoint "$OUT/sink.out")
  export AWS_ACCESS_KEY_ID=perf AWS_SECRET_ACCESS_KEY=perf AWS_REGION=us-east-1
  declare -A cpu rate
  local peers=("ours (aggregation on)" "ours (aggregation off)" "python aws-kinesis-agg + boto3" "node aws-kinesis-agg + sdk v3")
  for peer in "${peers[@]}"; do
    local log="$OUT/run.out"
    case "$peer" in
      "ours (aggregation on)") "$BIN" perf --endpoint-url "$endpoint" --records "$RECORDS" --record-size "$size" > "$log" ;;
      "ours (aggregation off)") "$BIN" perf --endpoint-url "$endpoint" --records "$RECORDS" --record-size "$size" --no-aggregation > "$log" ;;
      "python aws-kinesis-agg + boto3") .venv/bin/python benches/peers/python_agg.py "$endpoint" "$RECORDS" "$size" > "$log" ;;
      "node aws-kinesis-agg + sdk v3") NODE_NO_WARNINGS=1 node benches/peers/node_agg.js "$endpoint" "$RECORDS" "$size" > "$log" ;;
    esac
    cpu[$peer]=$(value cpu_ns_per_record "$log")
    rate[$peer]=$(value records_per_second "$log")
  done
  stop_sink
  echo
  echo "## $name: $size-byte records, random UUID keys, $shards shard(s), $RECORDS records"
  printf '| %-32s | %12s | %14s | %14s |\n' "producer" "records/s" "CPU ns/record" "CPU vs ours"
  printf '|%s|%s|%s|%s|\n' "----------------------------------" "--------------" "----------------" "----------------"
  local ours=${cpu["ours (aggregation on)"]}
  for peer in "${peers[@]}"; do
    local ratio
    ratio=$(awk -v p="${cpu[$peer]}" -v o="$ours" 'BEGIN { printf "%.1f×", p / o }')
    printf '| %-32s | %12s | %14s | %14s |\n' "$peer" "${rate[$peer]}" "${cpu[$peer]}" "$ratio"
    echo "$name,$size,$shards,$peer,$RECORDS,${rate[$peer]},${cpu[$peer]},${ratio%×}" >> "$CSV"
  done
  printf '| %-32s | %12s | %14s | %14s |\n' "python boto3-batch-utils" "-" "-" "$BATCH_UTILS"
}

run_workload W1 100 1
run_workload W2 1024 500
echo
echo "figures: $CSV"
