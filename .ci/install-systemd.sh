#!/usr/bin/env bash
# Installs systemd-analyze (Debian's `systemd` package) for tests/unit/test_systemd_units.py,
# which runs `systemd-analyze verify` and `security --offline` on systemd/*.service and
# fails (never skips) under CI=true when the tool is missing. Nothing is started: systemd
# is not PID 1 here, only the analyzer is used. A no-op when it is already installed.
set -euo pipefail

if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze --version | sed -n 1p
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || {
  echo "install-systemd: systemd-analyze is missing and apt-get is not available" >&2
  exit 1
}
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends systemd >/dev/null
systemd-analyze --version | sed -n 1p
