#!/usr/bin/env bash
# Measures the producer with `kinesis-producer perf` (release build, in-process null sink) over
# record sizes, shard counts and the four target workloads, then the memory and latency
# targets, writes every run to benches/results/perf-grid.csv and draws the plots next to it
# (examples/perf_plot.rs). About 3 minutes on 2 cores.
#
#   benches/perf-grid.sh [OUT_DIR]        (default benches/results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benches/results}"
mkdir -p "$OUT"
CSV="$OUT/perf-grid.csv"
cargo build --release --quiet --locked --bin kinesis-producer
BIN=target/release/kinesis-producer
COLUMNS_=(record_size shards keys threads records acknowledged failed records_per_second mb_per_second
  cpu_ns_per_record user_records_per_kinesis_record floor_ns_per_record efficiency peak_rss_bytes
  latency_p50_ms latency_p99_ms latency_max_ms beyond_floor_ns_per_record)
(IFS=,; echo "sweep,label,${COLUMNS_[*]}") > "$CSV"

# run SWEEP LABEL PERF-ARGS...: one perf run, appended to the CSV; prints the run's figures.
run() {
  local sweep=$1 label=$2
  shift 2
  local out
  # RUN_ENV: extra environment for this run (e.g. a glibc tunable).
  out=$(env ${RUN_ENV:-} "$BIN" perf --null-sink "$@" || true)
  local line="$sweep,$label"
  for column in "${COLUMNS_[@]}"; do
    line="$line,$(sed -n "s/^$column=//p" <<<"$out" | head -1)"
  done
  echo "$line" >> "$CSV"
  echo "$line"
}

echo "== throughput by record size (1 shard, random keys)"
for size in 10 100 1024 10240 102400; do
  records=$(( 400000000 / size )); [ "$records" -gt 2000000 ] && records=2000000
  run size "${size}B" --record-size "$size" --shards 1 --records "$records"
done
echo "== throughput by shard count (100-byte records, random keys)"
for shards in 1 16 64 256 1024 4096 10000; do
  run shards "${shards} shards" --record-size 100 --shards "$shards" --records 1000000
done
echo "== the four target workloads, three runs each"
for i in 1 2 3; do
  run workload W1 --record-size 100 --keys random --shards 1 --records 2000000
  run workload W2 --record-size 1024 --keys random --shards 500 --records 300000
  run workload W3 --record-size 1024 --keys ehk --shards 500 --records 300000
  run workload W4 --record-size 100 --keys random --shards 10000 --records 1000000
done
echo "== W2 and W3 over 1,000,000 records, one run each (the first touch of the memory weighs less)"
run workload-long "W2 1M records" --record-size 1024 --keys random --shards 500 --records 1000000
run workload-long "W3 1M records" --record-size 1024 --keys ehk --shards 500 --records 1000000
echo "== memory: default backlog (64 MiB), the sink stops answering after 20 requests"
run memory "W2 stalled sink" --record-size 1024 --shards 500 --records 300000 \
  --sink-stall-after 20 --record-ttl-ms 3000 --request-timeout-ms 1000
RUN_ENV=GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072 \
  run memory "W2 stalled sink; glibc mmap_threshold 128 KiB" --record-size 1024 --shards 500 \
  --records 300000 --sink-stall-after 20 --record-ttl-ms 3000 --request-timeout-ms 1000
run memory "W1 stalled sink" --record-size 100 --shards 1 --records 2000000 \
  --sink-stall-after 5 --record-ttl-ms 3000 --request-timeout-ms 1000
run memory "W2 answering sink" --record-size 1024 --shards 500 --records 300000
echo "== latency at 1000 records/s (every record timed)"
run latency "1000 records/s" --record-size 100 --shards 4 --records 10000 --rate 1000 --latency-every 1

if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ ! -f /usr/share/fonts/dejavu/DejaVuSans.ttf ]; then
  # The plots' labels need a font; plotters brings none.
  apt-get install -y -qq fonts-dejavu-core >/dev/null 2>&1 || sudo apt-get install -y -qq fonts-dejavu-core
fi
cargo run --release --quiet --locked --example perf_plot -- "$CSV"
echo "figures: $CSV"
