#!/usr/bin/env bash
# Create .venv (once) and install steerguard with the given extras; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-app}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
