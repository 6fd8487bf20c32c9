#!/usr/bin/env bash
# Install Debian's `prometheus` package when it is missing, so that tests/test_exporter.py can scrape
# the exporter with a real Prometheus server (the test starts and stops its own; it skips without one).
#
# Idempotent and quick when it is there already; does nothing without apt-get or root. The package's
# own service is never started: a temporary policy-rc.d refuses it (tests run their own server).
# Usage: scripts/install_prometheus.sh        (.ci/run calls it)
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "==> prometheus: not installed (needs apt-get and root); the real-Prometheus test will skip"
  exit 0
fi
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
echo "==> installing Debian's prometheus (for the exporter's scrape test)"
if ! install 2>/dev/null; then
  apt-get update -qq >/dev/null
  install
fi
prometheus --version 2>&1 | head -1
