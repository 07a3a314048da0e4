import os, sys, time, random, statistics
be = sys.argv[1]
from vllm import LLM, SamplingParams
from cab_models.models import prepare_model
m = str(prepare_model("smollm2-135m-instruct"))
kw = dict(max_model_len=8192, enforce_eager=True, enable_prefix_caching=False, dtype="bfloat16", seed=0)
if be == "CUSTOM":
    kw["attention_backend"] = "CUSTOM"
llm = LLM(m, **kw)
ids = [random.Random(1).randrange(100, 40000) for _ in range(4096)]
def gen(n_out, ids=ids):
    t = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - t, out[0].outputs[0].token_ids
gen(2)
tt = [gen(1)[0] for _ in range(3)]
tot = [gen(33)[0] for _ in range(2)]
print("RESULT", be, os.environ.get("CAB_SPARSITY"), "ttft", round(statistics.median(tt), 3), "tpot_ms", round((statistics.median(tot) - statistics.median(tt)) / 32 * 1e3, 2))
