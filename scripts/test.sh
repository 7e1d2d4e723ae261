#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow and distributed tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k packing`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# pytest exits 5 when it collects no test: that is a failure here too (set -e).
exec .venv/bin/python -m pytest "$@"
