# syntax=docker/dockerfile:1
# CAB-vLLM for a GPU node: cab-serve (the project's OpenAI-compatible server) over CUDA vLLM with CAB as the
# attention backend.
#
# Base image: the official vLLM OpenAI image, pinned to v0.33.0, the newest vLLM release in the range this
# package supports (pyproject.toml: vllm>=0.26,<0.34; measured on a GPU with 0.26, not yet with 0.33). It
# already holds CUDA torch, Triton, vLLM and everything the server needs (fastapi, uvicorn, pydantic, httpx,
# prometheus-client), so only this package is added, with --no-deps. v0.33.0 ships torch 2.14 built for CUDA 13:
# the node needs a driver that supports CUDA 13; for an older driver build on a v0.32.x tag
# (--build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.x). Pin by digest in production (tag@sha256:...).
#
#   docker build -t cab-vllm .
#   docker run --gpus all -p 8000:8000 -v cab-models:/models -e CAB_SPARSITY=0.9 cab-vllm
#   docker run ... cab-vllm --model /models/my-hf-folder --max-model-len 32768     # replaces CMD
#   -e VLLM_API_KEY=...  makes clients send "Authorization: Bearer ..." (cab-serve reads it; empty = no key)
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

ARG CAB_UID=10001
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/cab-vllm
COPY . .
# The package with --no-deps (the image has torch/triton/vLLM), then only the server extra's modules that the
# image lacks; the build fails here if cab-serve, the plugin or the packaged-model code (cab_models) did not
# install (checked from / so the source tree in the working directory cannot stand in for the installed packages:
# python -P). $missing is split into package names on purpose (SC2086).
# hadolint ignore=SC2086
RUN set -eux; \
    if command -v uv >/dev/null 2>&1; then PIP="uv pip install --system"; else PIP="python3 -m pip install"; fi; \
    $PIP --no-deps .; \
    missing=""; \
    for spec in fastapi:fastapi uvicorn:uvicorn pydantic:pydantic httpx:httpx prometheus_client:prometheus-client; do \
        python3 -c "import ${spec%%:*}" 2>/dev/null || missing="$missing ${spec#*:}"; \
    done; \
    if [ -n "$missing" ]; then $PIP $missing; fi; \
    command -v cab-serve; \
    python3 -P -c "import cab_vllm.backend, server.cli, vllm, cab_models.models; print('cab_vllm on vllm', vllm.__version__)"

# Non-root user; /models is the model / cache volume (Hugging Face cache, prepared models, vLLM's compile cache,
# and Triton's kernel cache: CAB compiles its kernels at engine start, and a restarted container finds them there).
RUN set -eux; \
    groupadd --gid "${CAB_UID}" cab; \
    useradd --create-home --uid "${CAB_UID}" --gid "${CAB_UID}" --shell /usr/sbin/nologin cab; \
    mkdir -p /models/huggingface /models/cab /models/vllm /models/triton; \
    chown -R cab:cab /models
ENV HF_HOME=/models/huggingface \
    CAB_CACHE_DIR=/models/cab \
    VLLM_CACHE_ROOT=/models/vllm \
    TRITON_CACHE_DIR=/models/triton \
    VLLM_USE_V2_MODEL_RUNNER=0 \
    CAB_SPARSITY=0.9 \
    CAB_POLICY=cab
# VLLM_USE_V2_MODEL_RUNNER=0: per-request sparsity/policy are read from the V1 model runner's batch; under the V2
# runner every request would get the engine defaults (README, "Notes and limits").
VOLUME ["/models"]
USER ${CAB_UID}:${CAB_UID}
WORKDIR /home/cab

EXPOSE 8000
# Model load and CUDA-graph capture of a 7B model take minutes: the start period covers them.
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=8)"]

# cab-serve's own defaults: --attention-backend CUSTOM (CAB on), CAB_SPARSITY / CAB_POLICY from the environment.
ENTRYPOINT ["cab-serve", "--host", "0.0.0.0", "--port", "8000"]
# A Hugging Face hub id or a folder under /models; 128k context through YaRN (factor 4 over Qwen2.5's native 32k):
# cab-serve's --rope-scaling merges it into the model's rope_parameters and sets max_position_embeddings.
CMD ["--model", "Qwen/Qwen2.5-7B-Instruct", \
     "--max-model-len", "131072", \
     "--rope-scaling", "{\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}", \
     "--gpu-memory-utilization", "0.90"]
