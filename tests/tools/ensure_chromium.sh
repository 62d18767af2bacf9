#!/usr/bin/env bash
# Make a headless Chromium available for the HTML report test (tests/test_analysis_report.py).
# Prints the browser's path and exits 0, or explains what is missing and exits 1.
# CI: run it once before pytest, as root or with passwordless sudo, on a Debian/Ubuntu image.
set -euo pipefail

find_browser() {
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  return 1
}

if path=$(find_browser); then echo "$path"; exit 0; fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: no chromium on PATH and no apt-get to install it; install Chromium or Chrome" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ensure_chromium: not root and no passwordless sudo; run: apt-get install -y chromium" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2 || true
$SUDO apt-get install -y -qq --no-install-recommends chromium >&2 \
  || $SUDO apt-get install -y -qq --no-install-recommends chromium-browser >&2
if path=$(find_browser); then echo "$path"; exit 0; fi
echo "ensure_chromium: apt-get ran but no chromium binary is on PATH" >&2
exit 1
