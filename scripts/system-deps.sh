#!/usr/bin/env bash
# Install the Debian packages of the named tools when they are missing (default: nginx and
# prometheus). nginx fronts every local deployment; prometheus runs in the monitoring tests and
# with monitor.prometheus=true; hey loads the tests' open-loop burst and the benches; dockerd
# (Debian's docker.io) is the tests' own Docker engine and mmdebstrap builds its base image when
# no image registry is reachable (scripts/docker-engine.sh, scripts/docker-base.sh).
#   scripts/system-deps.sh nginx            what fast-api/deploy.sh needs
#   scripts/system-deps.sh nginx prometheus hey
set -euo pipefail
[ $# -eq 0 ] && set -- nginx prometheus
missing=()
for tool in "$@"; do
  case "$tool" in
    nginx) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light) ;;
    prometheus) command -v prometheus >/dev/null 2>&1 || missing+=(prometheus) ;;
    hey) command -v hey >/dev/null 2>&1 || missing+=(hey) ;;
    dockerd) command -v dockerd >/dev/null 2>&1 || missing+=(docker.io) ;;
    mmdebstrap) command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap) ;;
    *) echo "system-deps.sh: unknown tool '$tool' (nginx, prometheus, hey, dockerd or mmdebstrap)" >&2; exit 2 ;;
  esac
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
# The packages start system services (nginx on :80, prometheus on :9090); neuronserve runs its own.
if command -v service >/dev/null 2>&1; then
  service nginx stop >/dev/null 2>&1 || true
  service prometheus stop >/dev/null 2>&1 || true
  service prometheus-node-exporter stop >/dev/null 2>&1 || true
  case " ${missing[*]} " in
    *" docker.io "*)  # just installed: the tests start their own dockerd
      service docker stop >/dev/null 2>&1 || true
      service containerd stop >/dev/null 2>&1 || true ;;
  esac
fi
