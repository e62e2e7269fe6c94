#!/usr/bin/env bash
# Make Debian's chromium (and chromium-driver) present for the dashboard's browser test
# (tests/e2e/test_dashboard.py drives /usr/bin/chromium through Playwright; Playwright's
# own browser download is not used). Idempotent and quiet: nothing to do, nothing said.
#
# A CJK font comes along (fonts-wqy-microhei), so the Chinese labels in the tests'
# screenshots are characters rather than empty boxes.
#
# 1. /usr/bin/chromium, chromedriver and the font are there: exit 0.
# 2. Root with apt-get: install them (apt-get update once if the packages are unknown).
# 3. Anything else: say what to run and exit 1.
set -euo pipefail

log() { printf 'ensure-browser: %s\n' "$*" >&2; }

if [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null 2>&1 && [ -d /usr/share/fonts/truetype/wqy ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get: install Chromium so that /usr/bin/chromium exists, then run again."
  exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
  log "chromium is missing and this is not root: run 'sudo apt-get install -y chromium chromium-driver'."
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show chromium >/dev/null 2>&1; then
  apt-get update -qq
fi
log "installing chromium, chromium-driver and fonts-wqy-microhei with apt-get"
if ! apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei >/tmp/ensure-browser.log 2>&1; then
  log "apt-get install failed; the last lines of /tmp/ensure-browser.log:"
  tail -n 20 /tmp/ensure-browser.log >&2
  exit 1
fi
