#!/usr/bin/env bash
# Bring CUDA vLLM to a GPU machine without network access. Run on a machine with PyPI access, in the project root:
#   bash benchmarks/gpu/prepare.sh [DIR] [PIECE_MB]        (default .gpu_carry, 38)
# vLLM 0.26.0 pins torch 2.11 (cu130), the torch the GPU machine has. This downloads the vLLM wheel and the wheels of
# its dependencies the machine lacks (have_packages.txt: the names it already has), drops the parts a Hopper
# machine serving dense decoder models does not load (FlashAttention-2 and Blackwell kernels, MoE and MLA
# extensions, the Rust frontend), packs everything as one xz tar and splits it into pieces of PIECE_MB MiB
# (carry each piece separately if your transfer has a size limit). On the GPU machine: install.sh.
set -euo pipefail
VLLM=${VLLM_VERSION:-0.26.0}
DIR=${1:-.gpu_carry}
MB=${2:-38}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do plat+=(--platform "manylinux_${p}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/vllm" "vllm==$VLLM"
whl=$(ls "$work"/vllm/vllm-*.whl)
unzip -p "$whl" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
  | grep -viE '^(torch|torchaudio|torchvision|torchcodec|PyNvVideoCodec|flashinfer|tilelang|nvidia-|humming|tokenspeed|quack|fastsafetensors|numba|apache-tvm|nvtx|instanttensor)' > "$work/req.txt"
python3 -m pip install -q --dry-run --ignore-installed "${plat[@]}" --target "$work/dry" --report "$work/report.json" -r "$work/req.txt"
python3 "$here/missing_on_device.py" "$work/report.json" > "$work/need.txt"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/pkg/wheels" -r "$work/need.txt" gguf
mkdir -p "$work/pkg/site"
(cd "$work/pkg/site" && unzip -q "$whl" && rm -rf vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs \
  vllm/third_party/fmha_sm100 vllm/_flashmla_C.abi3.so vllm/_qutlass_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so \
  vllm/third_party/deep_gemm/_C.cpython-31[0134]*)
mkdir -p "$DIR"
rm -f "$DIR"/vllm.pack.*
tar cf - -C "$work/pkg" site wheels | xz -T0 -6 | split -b "${MB}M" -d -a 2 - "$DIR/vllm.pack."
cp "$here/install.sh" "$DIR/"
echo "pieces in $DIR:"
ls -la "$DIR"
