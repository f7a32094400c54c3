# Sourced by scripts/test.sh and scripts/scatter-gather.sh: makes ./.venv hold what the tests and
# the example need (the AWS Python aggregation library, pinned in tests/interop/requirements.txt;
# moto and cbor2, pinned in tests/batch/requirements.txt), installing it on first use.
if ! .venv/bin/python -c 'import aws_kinesis_agg.aggregator, moto.server, cbor2' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check \
    -r tests/interop/requirements.txt -r tests/batch/requirements.txt
fi
