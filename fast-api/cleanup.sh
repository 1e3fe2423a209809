#!/usr/bin/env bash
# neuronserve cleanup for the deployment configured in config.properties (deploy.*); extra
# arguments go to `neuronserve cleanup` (e.g. --set deploy.name=other, --config my.properties).
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory -s venv EXTRAS=deploy 2>&1  # setup output on stdout: stderr is for errors
exec .venv/bin/neuronserve cleanup "$@"
