#!/usr/bin/env bash
# Create .venv (once) and install steerguard with the given extras; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-app}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
if [ "$extras" = dev ]; then
  # attack baselines for the detection testbed; --no-deps: torchattacks pins an old `requests` it never imports
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "torchattacks==3.5.1"
fi
