#!/usr/bin/env bash
# Prepare the tracing environment: the trace image when a Docker engine is reachable, else the
# local virtualenv. Says which path it took.
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory -s venv EXTRAS=trace,deploy,bundled,generate 2>&1  # setup output on stdout: stderr is for errors
exec .venv/bin/neuronserve image build --stage trace "$@"
