#!/usr/bin/env bash
# Prove the stack on a real host: neuronserve doctor, trace bert-base-uncased (b1, b8 x s128),
# deploy, load at concurrency 1..64, report against AWS's published figure, clean up.
#   ./scripts/hardware-acceptance.sh                       # an Inf2 host, bert-base-uncased
#   ./scripts/hardware-acceptance.sh --backend cpu --model bundled:all-MiniLM-L6-v2
# Extra arguments go to `neuronserve acceptance` (--instance-type, --concurrency, --duration).
# On a Neuron host neuronserve is installed next to the SDK (README "Neuron hosts"); the cpu
# venv that `make` builds would pin a CPU torch, so it is only built where there is no device.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G "/dev/neuron[0-9]*" > /dev/null; then
    exec neuronserve acceptance "$@"
fi
make --no-print-directory -s venv system-deps EXTRAS=tune,bundled SYSTEM_DEPS=nginx 2>&1
exec .venv/bin/neuronserve acceptance "$@"
