#!/usr/bin/env bash
# The base image of the cpu Dockerfiles (BASE_IMAGE) when no image registry is reachable: Debian
# bookworm's Python 3.11, built from Debian packages with mmdebstrap and imported into the engine
# at DOCKER_HOST. It behaves as python:3.11-slim does for the Dockerfiles: `python` and `pip` on
# PATH (a virtual environment at /opt/venv, so pip installs as it does there), useradd, CA
# certificates, LANG=C.UTF-8. The host's own certificate authorities (/usr/local/share/ca-certificates,
# where a site's TLS-inspecting proxy puts its CA) are trusted in the image too, by the system
# bundle, which pip is pointed at (PIP_CERT): pip's own bundle knows only the public CAs.
#   scripts/docker-base.sh [TAG]     default TAG: neuronserve-base:bookworm; prints the tag
# An image of that tag already in the engine is kept (delete it to rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-neuronserve-base:bookworm}"
if docker image inspect "$TAG" >/dev/null 2>&1; then echo "$TAG"; exit 0; fi
./scripts/system-deps.sh mmdebstrap >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building $TAG from Debian packages (mmdebstrap, about a minute)" >&2
mmdebstrap --quiet --variant=apt \
  --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
  --customize-hook='cp /usr/local/share/ca-certificates/*.crt "$1"/usr/local/share/ca-certificates/ 2>/dev/null || true' \
  --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
  --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
  --customize-hook='chroot "$1" /opt/venv/bin/pip --version >/dev/null' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  bookworm "$work/base.tar" >&2
docker import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  --message "neuronserve base: Debian bookworm, Python 3.11 (scripts/docker-base.sh)" \
  "$work/base.tar" "$TAG" >/dev/null
echo "$TAG"
