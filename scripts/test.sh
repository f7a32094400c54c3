#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests against an embedded Kinesis server
# (ferrokinesis, in-process on 127.0.0.1), CLI tests, doc tests, and a compile check of the
# examples and benchmarks. Needs only cargo and crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked --all-features --all-targets
cargo test --locked --all-features --doc
