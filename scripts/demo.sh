#!/usr/bin/env bash
# The demo: trace the bundled model, deploy it on every core behind nginx, load it, write a
# report, tear everything down (also on failure or Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
./trace-model/build.sh
./trace-model/run.sh
./fast-api/deploy.sh
trap './fast-api/cleanup.sh' EXIT
./fast-api/status.sh
.venv/bin/python run_apis.py --concurrency 1,4,16 --duration 5 --warmup 1 --name demo "$@"
