#!/usr/bin/env bash
# On the GPU machine, after install.sh: the engine comparison, one engine per process, printed as a table.
#   bash benchmarks/gpu/run.sh OUTDIR "FLASH_ATTN: CUSTOM:0.95 CUSTOM:0.99" [LENS]
#   TP=2 bash benchmarks/gpu/run.sh ...     tensor parallel over 2 GPUs (one host)
#   RUNNER=v2 bash benchmarks/gpu/run.sh ... vLLM's Model Runner V2 (default here: V1)
#   BATCH=8 bash benchmarks/gpu/run.sh ...  8 prompts of each length at once (8 x 128k of the 8B geometry's
#                                           bf16 KV is 137 GB: more than one H200 holds beside the weights)
#   PROFILE=4096 bash benchmarks/gpu/run.sh ... also the kernels of one decode step at that context (PROF lines
#                                           in each log; decode_profile in the summary line)
#   PROFILE_PROMPT=512 bash benchmarks/gpu/run.sh ... also the host and GPU timeline of one 512-token request's
#                                           first token (HOST lines; prompt_profile in the summary line)
set -uo pipefail
out=$1; runs=$2; lens=${3:-512,4096,32768,131072}
mkdir -p "$out"
for r in $runs; do
  be=${r%%:*}; sp=${r#*:}
  tag=${be}_${sp:-dense}${BATCH:+_b$BATCH}${TP:+_tp$TP}${RUNNER:+_$RUNNER}
  args=(--backend "$be" --lens "$lens" --out "$out/engine_$tag.jsonl")
  [ -n "$sp" ] && args+=(--sparsity "$sp")
  [ -n "${TP:-}" ] && args+=(--tp "$TP")
  [ -n "${BATCH:-}" ] && args+=(--batch "$BATCH")
  [ -n "${RUNNER:-}" ] && args+=(--runner "$RUNNER")
  [ -n "${PROFILE:-}" ] && args+=(--profile-decode "$PROFILE")
  [ -n "${PROFILE_PROMPT:-}" ] && args+=(--profile-prompt "$PROFILE_PROMPT")
  python3 benchmarks/gpu/engine_bench.py "${args[@]}" > "$out/log_$tag.txt" 2>&1 || { echo "FAILED $r"; tail -40 "$out/log_$tag.txt"; }
done
python3 - "$out" <<'PY'
import json, glob, sys
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/engine_*.jsonl")):
    for line in open(f):
        rows.append(json.loads(line))
for r in rows:
    if "n" in r:
        ph = "  ".join(f"{k} {v:.3f} s" for k, v in r.get("per_prompt_s", {}).items())
        print(f"{r['backend']:10} sp={r['sparsity']} b={r.get('batch', 1)} n={r['n']:>6}  TTFT {r['ttft_s']:.3f} s  TPOT {r['tpot_ms']:.2f} ms  {ph}")
    else:
        print(f"{r['backend']:10} sp={r['sparsity']} init {r['init_s']} s first {r['first_request_s']} s second {r['second_request_s']} s mem {r['mem_after_init_gib']} peak {r['peak_during_runs_gib']} GiB out {r['probe_out'][:8]} metrics {r.get('cab_metrics')}")
        p = r.get("decode_profile")
        if p:
            print(f"{r['backend']:10} sp={r['sparsity']} decode step at n={p['n']}: GPU {p['gpu_us_per_step']} us, span {p['span_us_per_step']} us; top: "
                  + "; ".join(f"{k[0][:40]} {k[2]} us x{k[1]}" for k in p["kernels"][:4]))
PY
