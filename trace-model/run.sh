#!/usr/bin/env bash
# Trace the configured model (config.properties) at every configured shape; in the trace image
# when a Docker engine is reachable, else locally. Extra arguments go to `neuronserve trace`,
# e.g. ./trace-model/run.sh --force   or   ./trace-model/run.sh --set trace.backend=cpu
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory -s venv EXTRAS=trace,deploy,bundled,generate 2>&1  # setup output on stdout: stderr is for errors
exec .venv/bin/neuronserve trace --runner auto "$@"
