"""Load generator for OpenAI-compatible servers (cab-serve, vLLM's api_server, anything that streams SSE).

    python -m loadtests run --base-url http://127.0.0.1:8000 --prompt-tokens 4096 --output-tokens 64 \\
        --num-requests 20 --concurrency 4 --label cab-0.9 --extra-body '{"sparsity": 0.9}'
    python -m loadtests compare loadtests/results/dense.json loadtests/results/cab-0.9.json --baseline dense

Modules: prompts (prompts of a given token length, Austen or synthetic text), client (one streamed request and
the arrival schedule), report (percentiles, the run summary, the comparison table). Dependencies: httpx only;
cab_vllm (Austen text) and transformers (exact token counts) are used when importable.
"""
