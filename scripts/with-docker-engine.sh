#!/usr/bin/env bash
# Run a command (the test suite) with the tests' own Docker engine: started before it
# (scripts/docker-engine.sh), named to it in NEURONSERVE_TEST_DOCKER_HOST (never DOCKER_HOST: the
# rest of the suite's local paths stay local), stopped after it whatever happens. Where no engine
# can run, the command runs without one and NEURONSERVE_TEST_DOCKER_WHY says why (the tests that
# need it are skipped with that reason). Exits with the command's status.
#   scripts/with-docker-engine.sh .venv/bin/pytest -q
set -uo pipefail
cd "$(dirname "$0")/.."
engine=scripts/docker-engine.sh
# Stopped however this ends, an interrupt while it starts included (stop is harmless when none runs).
trap '"$engine" stop' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if started=$("$engine" start 2>/tmp/neuronserve-docker-start.$$); then
  export NEURONSERVE_TEST_DOCKER_HOST="${started#DOCKER_HOST=}"
  echo "Docker engine for the tests: $NEURONSERVE_TEST_DOCKER_HOST (stopped when they end)"
else
  export NEURONSERVE_TEST_DOCKER_WHY="no Docker engine could start here: $(tail -n 3 /tmp/neuronserve-docker-start.$$ | tr '\n' ' ')"
  echo "$NEURONSERVE_TEST_DOCKER_WHY (the real_docker tests are skipped)"
fi
rm -f /tmp/neuronserve-docker-start.$$
"$@"
