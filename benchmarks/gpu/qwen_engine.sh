#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B through CAB in the CUDA vLLM engine: the long-context checks that need the real model.
# On the GPU machine, in the project root, after install.sh (vLLM in $STORE/site) and carry.sh unpack (the GGUF and
# Austen's text under $STORE/in; see BENCHMARKS.md "Running on a GPU machine without network"):
#   bash benchmarks/gpu/qwen_engine.sh OUT yarn     pass key at 64k and 128k with YaRN (factor 4, the experiments'
#                                                   rule): FLASH_ATTN, then CAB at 0 / 0.9 / 0.95; OUT/yarn_compare.txt
#   bash benchmarks/gpu/qwen_engine.sh OUT tasks    the task suite (python -m cab_experiments tasks --engine vllm) at
#                                                   4k-32k, every policy and sparsity: OUT/tasks_vllm.jsonl
#   YARN=4 LENGTHS="65536 130944" bash benchmarks/gpu/qwen_engine.sh OUT tasks   the suite at 64k and 128k with YaRN
#                                                   (the rows carry yarn=4; 130,944 leaves the answer its 128 positions)
#   bash benchmarks/gpu/qwen_engine.sh OUT seed     the same prompts with the seed pipeline (curvature policy on
#                                                   max-L2 pooled blocks: CAB_ESTIMATOR=max_l2, an engine-wide setting)
#   bash benchmarks/gpu/qwen_engine.sh OUT answer   the same prompts with the answer rows' floor (CAB_ANSWER_BLOCKS,
#                                                   env ANSWER_BLOCKS, 32 = 2048 tokens): cab, its adaptive budget and
#                                                   magnitude; OUT/tasks_vllm_answer.jsonl
#   bash benchmarks/gpu/qwen_engine.sh OUT tokens   the same prompts with dense prompts and token-sparse decode
#                                                   (CAB_DENSE_PREFILL=1 CAB_DECODE_RULE=tokens): cab and magnitude;
#                                                   OUT/tasks_vllm_tokens.jsonl
#   bash benchmarks/gpu/qwen_engine.sh OUT sparse-tokens  the same prompts with block-sparse prompts and token-sparse
#                                                   decode (CAB_DECODE_RULE=tokens, each decode step keeping
#                                                   DECODE_SPARSITY's keys, default 0.98, whatever the prompt's
#                                                   sparsity): cab and its adaptive budget; OUT/tasks_vllm_sparse_tokens.jsonl
#                                                   (ANSWER_DENSE=1: the prompt's last query block dense too,
#                                                   CAB_ANSWER_DENSE; the variants carry answer_dense=1;
#                                                   VERTICAL=1: every chunk's last rows' exact scores raise every
#                                                   query block's, CAB_VERTICAL_BLOCKS, vertical_blocks=1;
#                                                   ADAPTIVE=0: without the adaptive budget's variant)
#   bash benchmarks/gpu/qwen_engine.sh OUT dense-layers   the same prompts with the first layers dense
#                                                   (CAB_DENSE_LAYERS, env DENSE_LAYERS, 2): cab, its adaptive budget
#                                                   and magnitude; OUT/tasks_vllm_dense_layers.jsonl
# Env: LENGTHS (tasks; default "4096 8192 16384 32640": the 32k cell leaves 128 positions for the answer),
# SPARSITIES ("0.9 0.95 0.98 0.99"), TRIALS (1), DEPTHS ("0.1 0.5 0.9"), TIME_BUDGET (seconds per tasks run; rows
# already in the output are skipped when re-run), YARN_LENS ("65536,131056": 16 positions for the answer),
# DENSE_THRESHOLD (1024: rows below it run vLLM's FlashAttention whatever the policy), YARN (tasks with YaRN at this
# factor).
# POLICIES (tasks: the variants to run; default "dense cab cab:budget=adaptive h2o streaming magnitude random"),
# MODEL (a packaged model name; default qwen2.5-coder-0.5b-instruct), PY (the Python to run; python3).
set -euo pipefail
OUT=${1:?usage: qwen_engine.sh OUT yarn|tasks|seed|answer|tokens|sparse-tokens|dense-layers}
what=${2:?usage: qwen_engine.sh OUT yarn|tasks|seed|answer|tokens|sparse-tokens|dense-layers}
STORE=${STORE:-/tmp/cabstore}
NAME=${MODEL:-qwen2.5-coder-0.5b-instruct}; export PY=${PY:-python3}
# The longest prompts leave room for their answers inside the model's positions (32768, x4 with YaRN): vLLM's
# rotary table holds exactly those, and a position past it stops the engine (a device-side assert).
export CAB_CACHE_DIR=$STORE/in PYTHONPATH=$STORE/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  VLLM_USE_FLASHINFER_SAMPLER=0
mkdir -p "$OUT"
model=$STORE/in/models/$NAME
[ -d "$model" ] || bash experiments/device.sh prepare "$NAME"
LENGTHS=${LENGTHS:-"4096 8192 16384 32640"}; SPARSITIES=${SPARSITIES:-"0.9 0.95 0.98 0.99"}; TRIALS=${TRIALS:-1}
DEPTHS=${DEPTHS:-"0.1 0.5 0.9"}; DENSE_THRESHOLD=${DENSE_THRESHOLD:-1024}
opts=(); [ -n "${TIME_BUDGET:-}" ] && opts+=(--time-budget "$TIME_BUDGET")
[ -n "${YARN:-}" ] && opts+=(--yarn "$YARN")
tasks() {  # tasks OUTFILE POLICY...
  local out=$1; shift
  "$PY" -m cab_experiments tasks --engine vllm --model "$NAME" --dense-threshold "$DENSE_THRESHOLD" \
    --lengths $LENGTHS --sparsities $SPARSITIES --trials "$TRIALS" --depths $DEPTHS --policies "$@" \
    --gpu-memory-utilization 0.85 --max-num-batched-tokens 16384 --quiet "${opts[@]}" --out "$out"
}
case $what in
  yarn)
    lens=${YARN_LENS:-65536,131056}
    common=(--model "$model" --yarn 4 --lengths "$lens" --max-model-len 131072 --max-num-batched-tokens 16384
            --gpu-memory-utilization 0.85)
    "$PY" benchmarks/gpu/engine_correctness.py "${common[@]}" --backend FLASH_ATTN --out "$OUT/yarn_fa.json"
    "$PY" benchmarks/gpu/engine_correctness.py "${common[@]}" --backend CUSTOM --sparsities 0,0.9,0.95 \
      --out "$OUT/yarn_cab.json"
    "$PY" benchmarks/gpu/engine_correctness.py --compare "$OUT/yarn_fa.json" "$OUT/yarn_cab.json" \
      | tee "$OUT/yarn_compare.txt" ;;
  tasks)
    # shellcheck disable=SC2086
    tasks "$OUT/tasks_vllm.jsonl" ${POLICIES:-dense cab cab:budget=adaptive h2o streaming magnitude random} ;;
  seed)
    CAB_ESTIMATOR=max_l2 tasks "$OUT/tasks_vllm_seed.jsonl" curvature:estimator=max_l2 ;;
  answer)
    a=${ANSWER_BLOCKS:-32}
    CAB_ANSWER_BLOCKS=$a tasks "$OUT/tasks_vllm_answer.jsonl" "cab:answer_blocks=$a" \
      "cab:budget=adaptive,answer_blocks=$a" "magnitude:answer_blocks=$a" ;;
  tokens)
    CAB_DENSE_PREFILL=1 CAB_DECODE_RULE=tokens tasks "$OUT/tasks_vllm_tokens.jsonl" \
      "cab:decode_rule=tokens,dense_prefill=1" "magnitude:decode_rule=tokens,dense_prefill=1" ;;
  sparse-tokens)
    ds=${DECODE_SPARSITY:-0.98}; ad=${ANSWER_DENSE:-0}; vb=${VERTICAL:-0}; extra=""
    [ "$ad" = 1 ] && extra=",answer_dense=1"
    [ "$vb" = 1 ] && extra="$extra,vertical_blocks=1"
    variants=("cab:decode_rule=tokens,decode_sparsity=$ds$extra")
    [ "${ADAPTIVE:-1}" = 1 ] && variants+=("cab:budget=adaptive,decode_rule=tokens,decode_sparsity=$ds$extra")
    CAB_DECODE_RULE=tokens CAB_DECODE_SPARSITY=$ds CAB_ANSWER_DENSE=$ad CAB_VERTICAL_BLOCKS=$vb \
      tasks "$OUT/tasks_vllm_sparse_tokens.jsonl" "${variants[@]}" ;;
  dense-layers)
    n=${DENSE_LAYERS:-2}
    CAB_DENSE_LAYERS=$n tasks "$OUT/tasks_vllm_dense_layers.jsonl" "cab:dense_layers=$n" \
      "cab:budget=adaptive,dense_layers=$n" "magnitude:dense_layers=$n" ;;
  *) echo "usage: qwen_engine.sh OUT yarn|tasks|seed|answer|tokens|sparse-tokens|dense-layers"; exit 2 ;;
esac
