#!/usr/bin/env bash
# neuronserve deploy for the deployment configured in config.properties (deploy.*); extra
# arguments go to `neuronserve deploy` (e.g. --set deploy.name=other, --config my.properties).
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory -s venv system-deps EXTRAS=deploy SYSTEM_DEPS=nginx 2>&1  # setup output on stdout: stderr is for errors
exec .venv/bin/neuronserve deploy "$@"
