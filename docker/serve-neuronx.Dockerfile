# Serving image for the neuronx backend (Inf2/Trn1: the Neuron DLC brings torch, torch-neuronx and neuronx-cc); neuronserve installs on top without
# replacing its torch. One server per container, given its devices and NEURON_RT_VISIBLE_CORES
# by the Docker launcher. Artifacts are mounted read-only at /artifacts.
ARG BASE_IMAGE=public.ecr.aws/neuron/pytorch-inference-neuronx:2.1.2-neuronx-py310-sdk2.18.2-ubuntu20.04
# checkov:skip=CKV_DOCKER_7: the tag is pinned in BASE_IMAGE above
FROM ${BASE_IMAGE}
# What the image can do: serve (one server, the exporter) and trace (the Kubernetes trace Job).
# The bundled demo model needs EXTRAS=serve,trace,bundled; a load client in the cluster, bench.
ARG EXTRAS=serve,trace
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 NEURONSERVE_SERVE__HOST=0.0.0.0 NEURONSERVE_SERVE__PORT=8080 \
    NEURONSERVE_SERVE__ARTIFACTS=/artifacts
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/neuronserve
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# The dependencies are ranges, resolved against the image's own torch and numpy, which stay
# exactly as the image has them (the SDK and compiler were built against them).
# hadolint ignore=DL3013
RUN pip freeze | grep -iE '^(torch|numpy)==' > /tmp/keep.txt \
 && pip install -c /tmp/keep.txt ".[${EXTRAS}]" \
 && rm /tmp/keep.txt \
 && useradd --create-home --uid 10001 neuronserve
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=7s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/ready', timeout=5).status != 200)"]
# The DLC's own entrypoint script would sit between the server and SIGTERM (no drain) and keep
# the container alive after the server exits (no restart): run the server directly.
ENTRYPOINT []
CMD ["neuronserve", "serve"]
