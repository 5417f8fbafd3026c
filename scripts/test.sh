#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# the tests run tiny models, where extra threads cost more than they give
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "error: no tests were collected" >&2
fi
exit "$status"
