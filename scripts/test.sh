#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# the tests run tiny models, where extra threads cost more than they give
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# the layering contracts of pyproject.toml ([tool.importlinter]): a broken one fails the run
lint=0
.venv/bin/lint-imports --no-cache || lint=$?
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "error: no tests were collected" >&2
fi
if [ "$lint" -ne 0 ]; then
  echo "error: lint-imports found broken import contracts (see above)" >&2
  [ "$status" -ne 0 ] || status=$lint
fi
exit "$status"
