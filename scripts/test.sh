#!/usr/bin/env bash
# The whole test suite. On a fresh machine it installs what it needs itself:
#   - the interoperability peers (the AWS Python and Node aggregation libraries, pinned in
#     tests/interop/) into ./.venv and tests/interop/node_modules, and there too kinesis-local
#     (kinesis-mock), a second Kinesis server that tests/kinesis_mock.rs starts on 127.0.0.1;
#   - moto (PyPI, pinned in tests/batch/requirements.txt) into the same venv, the local server of
#     the batch helpers' tests and of the scatter-gather example's test (tests/batch.rs and
#     tests/scatter_gather.rs start it on 127.0.0.1; the venv is made by scripts/python-env.sh);
#   - cargo-fuzz, for a short coverage-guided fuzzing run of each fuzz target.
# Then: unit tests, integration tests against an embedded Kinesis server (ferrokinesis,
# in-process on 127.0.0.1), CLI tests, interop tests, properties, doc tests, and the fuzzing.
#
# FUZZ_SECONDS (default 30) is the time given to each fuzz target; 0 skips fuzzing.
set -euo pipefail
cd "$(dirname "$0")/.."

# A full disk shows up as some installer's ENOSPC far from its cause: say it first. A cold run
# needs about 5 GB (the debug build 3.8 GB, the venv, node_modules and the fuzz build).
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((5 * 1024 * 1024)) ]; then
  echo "warning: $((free_kb / 1024)) MB free on this disk; a cold run needs about 5 GB" >&2
fi

echo "== interop peers, moto and kinesis-local (Python venv, node_modules)"
source scripts/python-env.sh
if [ ! -d tests/interop/node_modules/aws-kinesis-agg ] || [ ! -d tests/interop/node_modules/kinesis-local ]; then
  npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error
fi
export KP_INTEROP_PYTHON="$PWD/.venv/bin/python"

echo "== cargo test"
cargo test --locked --all-features --all-targets
cargo test --locked --all-features --doc
# The aggregation format alone, as consumers without the SDK build it.
cargo test --locked --no-default-features --lib

fuzz_seconds="${FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" -gt 0 ]; then
  echo "== fuzzing, ${fuzz_seconds}s per target"
  if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --quiet
  fi
  # cargo-fuzz passes nightly-only flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
  export RUSTC_BOOTSTRAP=1
  for target in deaggregate jsonl; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus"
    cargo fuzz run --fuzz-dir fuzz -O "$target" "$corpus" "fuzz/seeds/$target" -- \
      -max_total_time="$fuzz_seconds" -max_len=65536 -print_final_stats=1 2>&1 |
      grep -E '^(#[0-9]+.*DONE|Done|stat::number_of_executed_units|==[0-9]+==|SUMMARY|thread .* panicked)' || true
    # libFuzzer exits non-zero on a crash; pipefail would hide it behind grep, so check again.
    if [ -n "$(ls -A "fuzz/artifacts/$target" 2>/dev/null)" ]; then
      echo "fuzzing found a crash in $target: see fuzz/artifacts/$target" >&2
      exit 1
    fi
  done
fi
