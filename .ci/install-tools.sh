#!/usr/bin/env bash
# Installs the tools the test suite runs (it fails, never skips, when one is missing):
#   systemd-analyze (package systemd)  tests/unit/test_systemd_units.py: `verify`,
#                                      `security --offline`, `calendar` on systemd/
#   promtool (package prometheus)      tests/unit/test_monitoring_rules.py: `check rules`
#                                      and `test rules` on monitoring/
#   fake-gcs-server (Go module)        the gcs store's tests: the GCS JSON API, in memory
#   azurite (npm package)              the azure store's tests: the Azure Blob REST API
# The two emulators are built or installed into the cache (tests/infra/emulators.py starts
# them from there on free loopback ports); go and npm must be on PATH for that.
# Only the tools are used; nothing is started. systemd is not PID 1 here, and the prometheus
# package's service is kept from starting during the install by a policy-rc.d that answers
# 101 ("action forbidden"), the Debian switch that invoke-rc.d and deb-systemd-invoke obey
# (an existing policy-rc.d is left as it is). A no-op when every tool is installed.
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

# Versions here and in tests/infra/emulators.py go together.
FAKE_GCS_VERSION=1.56.1
AZURITE_VERSION=3.37.0
tools="${DRSTREAM_CACHE:-$HOME/.cache/drstream}/tools"
fake_gcs="$tools/fake-gcs-server-$FAKE_GCS_VERSION"
if [ ! -x "$fake_gcs/fake-gcs-server" ]; then
  command -v go >/dev/null 2>&1 || { echo "install-tools: go is missing (fake-gcs-server)" >&2; exit 1; }
  GOBIN="$fake_gcs" go install "github.com/fsouza/fake-gcs-server@v$FAKE_GCS_VERSION"
fi
azurite="$tools/azurite-$AZURITE_VERSION"
if [ ! -x "$azurite/node_modules/.bin/azurite-blob" ]; then
  command -v npm >/dev/null 2>&1 || { echo "install-tools: npm is missing (azurite)" >&2; exit 1; }
  # azurite declares node >= 22; its blob service runs on node 20 (the engine check warns)
  npm install --silent --no-audit --no-fund --prefix "$azurite" "azurite@$AZURITE_VERSION" 2>&1 \
    | grep -v EBADENGINE || true
fi
echo "fake-gcs-server $FAKE_GCS_VERSION, azurite $AZURITE_VERSION (in $tools)"

systemd-analyze --version | sed -n 1p
promtool --version 2>&1 | sed -n 1p
