#!/usr/bin/env bash
# Install the Debian packages neuronserve runs when they are missing: nginx (deployments),
# prometheus (monitoring) and hey (bench/loadgen_vs_hey.py).
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v hey >/dev/null 2>&1 || missing+=(hey)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
# The package starts a system nginx on port 80; neuronserve runs its own per deployment.
# The packages start system services (nginx on :80, prometheus on :9090); neuronserve runs its own.
if command -v service >/dev/null 2>&1; then
  service nginx stop >/dev/null 2>&1 || true
  service prometheus stop >/dev/null 2>&1 || true
  service prometheus-node-exporter stop >/dev/null 2>&1 || true
fi
