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
  # the browser test drives a system Chromium with playwright: Debian's package when we can install it
  if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1 && [ -z "${STEERGUARD_CHROMIUM:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing chromium (apt) for tests/test_browser.py" >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
        || echo "setup: could not install chromium; tests/test_browser.py will skip (fail under CI)" >&2
    else
      echo "setup: no chromium; install it (e.g. apt-get install chromium) to run tests/test_browser.py" >&2
    fi
  fi
fi
