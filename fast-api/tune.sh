#!/usr/bin/env bash
# neuronserve tune for the model configured in config.properties: shapes from traffic, then the
# deployment with the best throughput within bench.latency_budget_ms; writes results/tune-<stamp>/.
# Extra arguments go to `neuronserve tune` (e.g. --dataset traffic.jsonl --time-budget 900).
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory -s venv system-deps EXTRAS=tune,bundled SYSTEM_DEPS=nginx 2>&1  # setup output on stdout: stderr is for errors
exec .venv/bin/neuronserve tune "$@"
