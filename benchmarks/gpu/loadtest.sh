#!/usr/bin/env bash
# The serving load test on a GPU machine: cab-serve with the Llama-3.1-8B geometry and dummy weights (nothing to
# carry but SmolLM2's tokenizer, whose 49152-token vocabulary the geometry uses), max-model-len 131584, driven by
# vllm bench serve (python -m loadtests) at each prompt length x concurrency; one server per call.
#   bash benchmarks/gpu/loadtest.sh FLASH_ATTN OUTDIR               FlashAttention, vLLM's own backend
#   bash benchmarks/gpu/loadtest.sh CUSTOM OUTDIR "0.95 0.99"        CAB, each sparsity per request
# Env: PROMPTS="32768 65536 131072", CONCS="1 4", N=4 (requests per scenario), OUT_TOKENS=64, PORT=8000,
#      TOKENIZER (default: the prepared smollm2-135m-instruct folder), SERVER_ARGS (more cab-serve flags),
#      MAX_LEN=131584, MEM=0.9 (--gpu-memory-utilization), TINY=1 (a 2-layer model of the same vocabulary: a smoke
#      test of this script on a small machine).
# Needs vLLM and this project installed (benchmarks/gpu/install.sh) and the SmolLM2 model prepared
# (python3 -m cab_models.models prepare smollm2-135m-instruct). Tables: python3 -m loadtests compare OUTDIR/*.json
set -euo pipefail
backend=$1; out=$2; sparsities=${3:-}
PROMPTS=${PROMPTS:-"32768 65536 131072"}; CONCS=${CONCS:-"1 4"}; N=${N:-4}; OUT_TOKENS=${OUT_TOKENS:-64}
PORT=${PORT:-8000}; MAX_LEN=${MAX_LEN:-131584}; MEM=${MEM:-0.9}; TINY=${TINY:-0}
TOKENIZER=${TOKENIZER:-$(python3 -m cab_models.models prepare smollm2-135m-instruct)}
read -r -a server_args <<< "${SERVER_ARGS:-}"
mkdir -p "$out"
model=$(mktemp -d)
python3 - "$model" "$TOKENIZER" "$TINY" <<'PY'
import json, shutil, sys
from pathlib import Path
model, tok, tiny = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=49152,
           max_position_embeddings=135168, rope_theta=500000.0, rms_norm_eps=1e-5, torch_dtype="bfloat16",
           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
if tiny:
    cfg.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64)
(model / "config.json").write_text(json.dumps(cfg))
for f in tok.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
        shutil.copy(f, model / f.name)
PY
case $backend in
  FLASH_ATTN) label=fa ;;
  CUSTOM) label=cab ;;
  *) echo "backend must be FLASH_ATTN or CUSTOM, got $backend" >&2; exit 2 ;;
esac
python3 -m server --model "$model" --served-model-name llama8b-dummy --load-format dummy \
  --attention-backend "$backend" --max-model-len "$MAX_LEN" --gpu-memory-utilization "$MEM" --port "$PORT" \
  "${server_args[@]}" \
  > "$out/server-$label.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
t0=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
  kill -0 $pid 2>/dev/null || { echo "server exited:"; tail -30 "$out/server-$label.log"; exit 1; }
  [ $(( $(date +%s) - t0 )) -lt 400 ] || { echo "server not healthy after 400 s"; exit 1; }
  sleep 2
done
echo "$label: healthy after $(( $(date +%s) - t0 )) s"
read -r -a prompts <<< "$PROMPTS"; read -r -a concs <<< "$CONCS"
extra=()
if [ -n "$sparsities" ]; then read -r -a sps <<< "$sparsities"; extra=(--sparsity "${sps[@]}"); fi
python3 -m loadtests run --base-url "http://127.0.0.1:$PORT" --model llama8b-dummy --tokenizer "$model" \
  --endpoint completions --label "$label" --prompt-tokens "${prompts[@]}" --concurrency "${concs[@]}" \
  --output-tokens "$OUT_TOKENS" --num-requests "$N" --warmup 1 "${extra[@]}" --out-dir "$out" --quiet
