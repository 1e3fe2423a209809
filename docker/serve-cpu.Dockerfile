# Serving image for the cpu backend: one server (gunicorn + one uvicorn worker) per container.
# Build context: the repository root. Artifacts are mounted read-only at /artifacts.
# BASE_IMAGE: any Debian-like image with Python 3.10+ on PATH as `python` (where no registry is
# reachable, scripts/docker-base.sh builds one from Debian packages).
ARG BASE_IMAGE=python:3.11-slim
# checkov:skip=CKV_DOCKER_7: the tag is pinned in BASE_IMAGE above
FROM ${BASE_IMAGE} AS build
# What the image can do: serve (one server, the exporter; ONNX Runtime, the default, or TorchScript
# artifacts) and trace (the Kubernetes trace Job).
# The bundled demo model needs EXTRAS=serve,trace,bundled; a load client in the cluster, bench.
ARG EXTRAS=serve,trace
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1
WORKDIR /opt/neuronserve
# docker/wheels: wheels given to the build (torch's CPU build where its index is unreachable);
# only this stage sees them. torch first, without its dependencies, from the CPU index or those
# wheels (PyPI's is the CUDA build); then the package with EXTRAS and torch's dependencies from
# the index. No plotting, Docker SDK, supervisor or Grafana SDK in a serving image.
COPY docker/wheels ./wheels
COPY constraints ./constraints
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python -m venv /opt/neuronserve/venv \
 && venv/bin/pip install --no-deps --retries 1 --find-links wheels --index-url "${TORCH_INDEX}" \
    -c constraints/cpu.txt torch \
 && venv/bin/pip install -c constraints/cpu.txt ".[${EXTRAS}]"

FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PATH=/opt/neuronserve/venv/bin:$PATH \
    NEURONSERVE_SERVE__HOST=0.0.0.0 NEURONSERVE_SERVE__PORT=8080 NEURONSERVE_SERVE__ARTIFACTS=/artifacts
COPY --from=build /opt/neuronserve/venv /opt/neuronserve/venv
RUN useradd --create-home --uid 10001 neuronserve
USER 10001
WORKDIR /home/neuronserve
EXPOSE 8080
# Ready means every copy answered every compiled shape.
HEALTHCHECK --interval=10s --timeout=7s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/ready', timeout=5).status != 200)"]
CMD ["neuronserve", "serve"]
