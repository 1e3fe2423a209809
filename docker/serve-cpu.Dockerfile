# Serving image for the cpu backend: one server (gunicorn + one uvicorn worker) per container.
# Build context: the repository root. Artifacts are mounted read-only at /artifacts.
FROM python:3.11-slim
# What the image can do: serve (one server, the exporter; ONNX Runtime, the default, or TorchScript
# artifacts) and trace (the Kubernetes trace Job).
# The bundled demo model needs EXTRAS=serve,trace,bundled; a load client in the cluster, bench.
ARG EXTRAS=serve,trace
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 NEURONSERVE_SERVE__HOST=0.0.0.0 NEURONSERVE_SERVE__PORT=8080 \
    NEURONSERVE_SERVE__ARTIFACTS=/artifacts
WORKDIR /opt/neuronserve
COPY constraints ./constraints
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# The CPU build of torch first (constraints/cpu.txt), so nothing pulls a CUDA build; then only
# EXTRAS: no plotting, Docker SDK, supervisor or Grafana SDK in a serving image.
RUN pip install -c constraints/cpu.txt torch --index-url https://download.pytorch.org/whl/cpu \
 && pip install -c constraints/cpu.txt ".[${EXTRAS}]" \
 && useradd --create-home --uid 10001 neuronserve
USER 10001
EXPOSE 8080
# Ready means every copy answered every compiled shape.
HEALTHCHECK --interval=10s --timeout=7s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/ready', timeout=5).status != 200)"]
CMD ["neuronserve", "serve"]
