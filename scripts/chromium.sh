#!/usr/bin/env bash
# The headless browser the HTML report's tests read the page back with (tests/report/test_browser.py):
# Debian's Chromium, from the system's packages (about 30 s; `make test` and .ci/run call this).
# Playwright, from the lock, drives it; no browser is downloaded from anywhere else.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "chromium is missing: install Debian's chromium package (apt-get install chromium) for the report's browser test" >&2
  exit 1
fi
echo "installing chromium (Debian's package) for the HTML report's browser test"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
