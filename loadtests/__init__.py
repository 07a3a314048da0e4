"""Load tests of OpenAI-compatible servers (cab-serve, vLLM's api_server) through vLLM's ``vllm bench serve``.

    python -m loadtests run --base-url http://127.0.0.1:8000 --model smollm2 --tokenizer $MODEL_DIR \\
        --prompt-tokens 4096 7168 --concurrency 1 4 --output-tokens 16 --num-requests 4 --label cab --sparsity 0 0.9
    python -m loadtests compare loadtests/results/dense_*.json loadtests/results/cab-*.json --baseline dense

Modules: bench (a scenario -> the ``vllm bench serve`` arguments; runs it in-process), report (the comparison
table of bench serve result JSONs, in bench serve's metric names: ttft, tpot, itl, e2el with mean / median / p99,
request_throughput, output_throughput, request_goodput). See loadtests/README.md for what bench serve does here and
what this package keeps on top of it.
"""
