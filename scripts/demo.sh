#!/usr/bin/env bash
# The demo: trace the bundled embedder and a demo reranker, deploy both on every core behind
# nginx, load each model, write a report per model, tear everything down (also on failure or
# Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
./trace-model/build.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# The second model, served beside model.* by every server (settings from the environment, so the
# committed config.properties stays the single-model default).
.venv/bin/python scripts/demo_reranker.py demo-models/reranker
export NEURONSERVE_MODELS__RERANKER__SOURCE="$PWD/demo-models/reranker"
export NEURONSERVE_MODELS__RERANKER__TASK=text-classification
./trace-model/run.sh
./fast-api/deploy.sh
trap './fast-api/cleanup.sh' EXIT
./fast-api/status.sh
.venv/bin/python run_apis.py --model all-MiniLM-L6-v2 --route /v1/embeddings \
  --concurrency 1,4,16 --duration 5 --warmup 1 --name demo-embeddings "$@"
.venv/bin/python run_apis.py --model reranker --route /rerank \
  --concurrency 1,4,16 --duration 5 --warmup 1 --name demo-rerank "$@"
