#!/usr/bin/env bash
# Install Debian's chromium for the headless-browser test of tools/show_tokens.py (tests/test_show_tokens.py).
# Idempotent: does nothing when a chromium binary is already on PATH. Needs root or sudo (apt-get).
#   bash tools/setup_browser.sh
set -euo pipefail
for bin in chromium chromium-browser; do
  if command -v "$bin" >/dev/null 2>&1; then
    echo "$bin: $(command -v "$bin") ($("$bin" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium
echo "chromium: $(command -v chromium) ($(chromium --version 2>/dev/null || echo 'version unknown'))"
