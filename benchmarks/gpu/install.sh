#!/usr/bin/env bash
# On the GPU machine, in the project root (see prepare.sh):
#   bash benchmarks/gpu/install.sh keep DIR       each time pieces arrive in DIR (kept in $STORE, default /tmp/cabstore)
#   bash benchmarks/gpu/install.sh install DIR    once all pieces are there: unpacks vLLM, installs its missing
#                                                 dependencies and this project into $STORE/site; prints what to export
set -euo pipefail
STORE=${STORE:-/tmp/cabstore}; mkdir -p "$STORE"
case $1 in
  keep) mv "$2"/vllm.pack.* "$STORE/" 2>/dev/null || true; ls "$STORE" ;;
  install)
    mv "$2"/vllm.pack.* "$STORE/" 2>/dev/null || true
    if [ ! -d "$STORE/site/vllm" ]; then
      cat $(ls "$STORE"/vllm.pack.* | sort) | xz -dc | tar xf - -C "$STORE"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STORE/site" "$STORE"/wheels/*.whl
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$STORE/site" .
    echo "export PYTHONPATH=$STORE/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1"
    PYTHONPATH=$STORE/site python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" ;;
  *) echo "usage: install.sh keep|install DIR"; exit 2 ;;
esac
