#!/usr/bin/env bash
# On the GPU machine, after install.sh: the engine comparison, one engine per process, printed as a table.
#   bash benchmarks/gpu/run.sh OUTDIR "FLASH_ATTN: CUSTOM:0.95 CUSTOM:0.99" [LENS]
#   TP=2 bash benchmarks/gpu/run.sh ...     tensor parallel over 2 GPUs (one host)
#   RUNNER=v2 bash benchmarks/gpu/run.sh ... vLLM's Model Runner V2 (default here: V1)
#   BATCH=8 bash benchmarks/gpu/run.sh ...  8 prompts of each length at once (8 x 128k of the 8B geometry's
#                                           bf16 KV is 137 GB: more than one H200 holds beside the weights)
#   LAYERS=16 BATCH=8 bash benchmarks/gpu/run.sh ...  the 8B geometry with 16 of its 32 layers: every layer is the
#                                           same, so CAB's TPOT against FLASH_ATTN's is the 32-layer ratio to first
#                                           order, and 8 x 128k of KV (69 GB at 16 layers) fits one H200
#   WEIGHTS=normal bash benchmarks/gpu/run.sh ...  the model's weights redrawn as a fresh model's (engine_bench.py
#                                           --weights normal: keys score apart as on real text)
#   PROFILE=4096 bash benchmarks/gpu/run.sh ... also the kernels of one decode step at that context (PROF lines
#                                           in each log; decode_profile in the summary line)
#   STEADY=1 LAYERS=16 BATCH=8 bash benchmarks/gpu/run.sh ...  also the decode step of the batch with all of it
#                                           decoding (engine_bench.py --steady-decode; STEADY lines, steady_decode)
#   PROFILE_PROMPT=512 bash benchmarks/gpu/run.sh ... also the host and GPU timeline of one 512-token request's
#                                           first token (HOST lines; prompt_profile in the summary line)
#   FIRST_PROFILE=32768 bash benchmarks/gpu/run.sh ... also the timelines of two 32k requests of one token, the
#                                           first after a 2-token request, the second after a 65-token one (the
#                                           timed runs' order), and their difference (FIRSTREQ/FIRSTKERN lines)
#   IDLE=2 bash benchmarks/gpu/run.sh ...     the engine idles 2 s before each timed first-token request (and each
#                                           profiled one of FIRST_PROFILE): engine_bench.py --idle-before
#   SCHED=cab bash benchmarks/gpu/run.sh ...  CAB's scheduler (cab-serve's: prefill chunks end at CAB's blocks):
#                                           engine_bench.py --scheduler cab
#   HOST_PHASES=512 bash benchmarks/gpu/run.sh ... also the engine's host steps of 16 512-token requests of one
#                                           token, timed (PHASE lines; host_phases in the summary line)
#   ... "CUSTOM:0.95 CUSTOM:0.95@CAB_GRAPH_BRANCHES=1,CAB_FUSED_SELECT=1" a run with CAB_* variables of its own
#                                           (after @, comma separated; in its file names and summary line)
#   ... "CUSTOM:0.95@FA_GRAPH_SPLITS=8"     vLLM's flash_attn_max_num_splits_for_cuda_graph for that run (may sit
#                                           among the CAB_* variables)
#   ... "CUSTOM:0.95@BLOCK_SIZE=64"         the KV cache's tokens per page for that run (vLLM's --block-size)
#   ... "CUSTOM:0.95@FA_VERSION=2"          vLLM's flash_attn_version for that run (the FlashAttention of the dense rows)
#   ... "CUSTOM:0.95@MAX_LEN=131072"        the engine's max_model_len for that run (default: the longest prompt + room)
set -uo pipefail
# a run's variables that are engine_bench.py arguments (engine settings), not CAB_* variables
declare -A ENGINE_ARG=([FA_GRAPH_SPLITS]=--fa-graph-splits [BLOCK_SIZE]=--block-size [FA_VERSION]=--fa-version
                       [MAX_LEN]=--max-model-len)
out=$1; runs=$2; lens=${3:-512,4096,32768,131072}
mkdir -p "$out"
for r in $runs; do
  spec=${r%%@*}; envs=""; [ "$spec" != "$r" ] && envs=${r#*@}
  be=${spec%%:*}; sp=${spec#*:}; [ "$sp" = "$spec" ] && sp=""
  extra=(); suffix=""; engine=()
  if [ -n "$envs" ]; then
    IFS=, read -ra extra <<< "$envs"
    cab=()
    for e in "${extra[@]}"; do
      if [[ $e =~ ^([A-Z_]+)=([0-9]+)$ && -n ${ENGINE_ARG[${BASH_REMATCH[1]}]:-} ]]; then
        engine+=("${ENGINE_ARG[${BASH_REMATCH[1]}]}" "${BASH_REMATCH[2]}"); continue
      fi
      [[ $e =~ ^CAB_[A-Z_]+=[^[:space:]]*$ ]] || { echo "run.sh: $e in $r is not CAB_NAME=VALUE"; exit 2; }
      cab+=("$e")
    done
    extra=("${cab[@]}")
    suffix=_$(printf '%s' "$envs" | tr ',=' '_-')
  fi
  tag=${be}_${sp:-dense}${suffix}${WEIGHTS:+_w$WEIGHTS}${BATCH:+_b$BATCH}${LAYERS:+_l$LAYERS}${TP:+_tp$TP}${RUNNER:+_$RUNNER}${IDLE:+_idle$IDLE}${SCHED:+_sched$SCHED}
  args=(--backend "$be" --lens "$lens" --out "$out/engine_$tag.jsonl")
  [ -n "$sp" ] && args+=(--sparsity "$sp")
  [ -n "${TP:-}" ] && args+=(--tp "$TP")
  [ -n "${BATCH:-}" ] && args+=(--batch "$BATCH")
  [ -n "${LAYERS:-}" ] && args+=(--layers "$LAYERS")
  [ -n "${WEIGHTS:-}" ] && args+=(--weights "$WEIGHTS")
  [ -n "${RUNNER:-}" ] && args+=(--runner "$RUNNER")
  args+=("${engine[@]}")
  [ -n "${PROFILE:-}" ] && args+=(--profile-decode "$PROFILE")
  [ -n "${PROFILE_PROMPT:-}" ] && args+=(--profile-prompt "$PROFILE_PROMPT")
  [ -n "${HOST_PHASES:-}" ] && args+=(--host-phases "$HOST_PHASES")
  [ -n "${FIRST_PROFILE:-}" ] && args+=(--first-request-profile "$FIRST_PROFILE")
  [ -n "${IDLE:-}" ] && args+=(--idle-before "$IDLE")
  [ -n "${SCHED:-}" ] && args+=(--scheduler "$SCHED")
  [ "${STEADY:-}" = 1 ] && args+=(--steady-decode)
  env "${extra[@]}" python3 benchmarks/gpu/engine_bench.py "${args[@]}" > "$out/log_$tag.txt" 2>&1 \
    || { echo "FAILED $r"; tail -40 "$out/log_$tag.txt"; }
done
python3 - "$out" <<'PY'
import json, glob, sys
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/engine_*.jsonl")):
    tag = f.rsplit("/", 1)[-1][len("engine_"):-len(".jsonl")]
    try:  # where CAB's engine start went: the warm-up's own line in the run's log (backend.warmup)
        warm = next((l.strip() for l in open(f"{sys.argv[1]}/log_{tag}.txt") if "CAB warm-up" in l), None)
    except OSError:
        warm = None
    rows.append({"file": tag, "warm": warm})
    for line in open(f):
        rows.append(json.loads(line))
for r in rows:
    if "file" in r:
        print(f"== {r['file']}")
        if r["warm"]:
            print("   " + r["warm"][r["warm"].index("CAB warm-up"):])
        continue
    if "n" in r:
        ph = "  ".join(f"{k} {v:.3f} s" for k, v in r.get("per_prompt_s", {}).items())
        st = r.get("steady_decode")
        st = f"  steady decode {st['step_ms']:.2f} ms/step ({st['steps']} steps)" if st else ""
        print(f"{r['backend']:10} sp={r['sparsity']} b={r.get('batch', 1)} n={r['n']:>6}  TTFT {r['ttft_s']:.3f} s  TPOT {r['tpot_ms']:.2f} ms{st}  {ph}")
    else:
        env = " ".join(f"{k}={v}" for k, v in r.get("cab_env", {}).items() if k != "CAB_SPARSITY")
        for key, name in (("fa_graph_splits", "flash_attn_max_num_splits_for_cuda_graph"),
                          ("fa_version", "flash_attn_version"), ("block_size", "block_size"),
                          ("max_model_len", "max_model_len")):
            if r.get(key) is not None:
                env = (env + f" {name}={r[key]}").strip()
        if env:
            print(f"{r['backend']:10} sp={r['sparsity']} with {env}")
        print(f"{r['backend']:10} sp={r['sparsity']} init {r['init_s']} s first {r['first_request_s']} s second {r['second_request_s']} s mem {r['mem_after_init_gib']} peak {r['peak_during_runs_gib']} GiB out {r['probe_out'][:8]} metrics {r.get('cab_metrics')}")
        p = r.get("decode_profile")
        if p:
            print(f"{r['backend']:10} sp={r['sparsity']} decode step at n={p['n']}: GPU {p['gpu_us_per_step']} us, span {p['span_us_per_step']} us; top: "
                  + "; ".join(f"{k[0][:40]} {k[2]} us x{k[1]}" for k in p["kernels"][:4]))
        hp = r.get("host_phases")
        if hp:
            top = sorted(hp["phases"].items(), key=lambda kv: -kv[1]["total_ms"])[:6]
            print(f"{r['backend']:10} sp={r['sparsity']} host steps of a {hp['n']}-token request: wall {hp['wall_ms']} ms; "
                  + "; ".join(f"{k.split('.')[-1]} {v['total_ms']} ms" for k, v in top))
        h = r.get("prompt_profile")
        if h:
            print(f"{r['backend']:10} sp={r['sparsity']} one {h['n']}-token request: host {h['host_us']} us "
                  f"({h['host_ops']} ops), GPU from {h.get('first_gpu_us')} to {h.get('last_gpu_us')} us, busy "
                  f"{h['gpu_busy_us']} us; top host ops: " + "; ".join(f"{o[0][:30]} {o[2]} us x{o[1]}" for o in h["ops"][:4]))
PY
