#!/usr/bin/env bash
# The scatter-gather example on local servers, no AWS account needed. Installs moto into ./.venv
# on first use, then runs the example (release build); arguments go to the example:
#   ./scripts/scatter-gather.sh                                  10,000 records, chunks of 100, 8 workers
#   ./scripts/scatter-gather.sh --records 1000 --chunk 1 --workers 4 --redeliver-every 5
#   ./scripts/scatter-gather.sh --bench                          the benchmark matrix: CSV and PNG
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
exec cargo run --release --locked --features batch-sqs,batch-dynamodb,batch-s3 --example scatter_gather -- "$@"
