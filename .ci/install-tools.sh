#!/usr/bin/env bash
# Installs the Debian tools the test suite runs (it fails, never skips, when one is missing):
#   systemd-analyze (package systemd)  tests/unit/test_systemd_units.py: `verify`,
#                                      `security --offline`, `calendar` on systemd/
#   promtool (package prometheus)      tests/unit/test_monitoring_rules.py: `check rules`
#                                      and `test rules` on monitoring/
# Only the tools are used; nothing is started. systemd is not PID 1 here, and the prometheus
# package's service is kept from starting during the install by a policy-rc.d that answers
# 101 ("action forbidden"), the Debian switch that invoke-rc.d and deb-systemd-invoke obey
# (an existing policy-rc.d is left as it is). A no-op when both tools are installed.
set -euo pipefail

declare -A packages=([systemd-analyze]=systemd [promtool]=prometheus)
missing=()
for tool in "${!packages[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${packages[$tool]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || {
    echo "install-tools: missing packages ${missing[*]} and apt-get is not available" >&2
    exit 1
  }
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    trap '$sudo rm -f "$policy"' EXIT
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 0755 "$policy"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
systemd-analyze --version | sed -n 1p
promtool --version 2>&1 | sed -n 1p
