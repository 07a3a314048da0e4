"""cab-serve's command line without starting an engine: flag validation, CAB defaults, the packaged model,
RoPE scaling pass-through and the --max-model-len check (vLLM's engine config, built in-process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from conftest import environ_restored  # noqa: E402
from server import cli  # noqa: E402

CAB_ENV = ("CAB_SPARSITY", "CAB_POLICY", "CAB_DENSE_THRESHOLD", "VLLM_API_KEY", "VLLM_CPU_KVCACHE_SPACE",
           "VLLM_USE_V2_MODEL_RUNNER")


@pytest.fixture(autouse=True)
def clean_env():
    """Each test starts without CAB_ENV, and every variable parse_args sets (CAB_POLICY, CAB_SPARSITY, ...) is gone
    afterwards (a leaked CAB_POLICY would change the engine defaults of whatever test runs next in the process)."""
    with environ_restored():
        for var in CAB_ENV:
            os.environ.pop(var, None)
        yield


@pytest.fixture(scope="module")
def model_dir() -> str:
    from cab_models.models import prepare_model

    return str(prepare_model("smollm2-135m-instruct"))


def parse_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--sparsity", "1.5"], "argument --sparsity: expected a number in [0, 1), got '1.5'"),
    (["--sparsity", "-0.1"], "argument --sparsity: expected a number in [0, 1)"),
    (["--sparsity", "nan"], "argument --sparsity: expected a number in [0, 1)"),
    (["--sparsity", "abc"], "argument --sparsity: expected a number in [0, 1)"),
    (["--policy", "bridges"], "argument --policy: invalid choice: 'bridges' (choose from 'cab', 'curvature'"),
    (["--rope-scaling", "{bad"], "argument --rope-scaling: not valid JSON"),
    (["--rope-scaling", "[4]"], "argument --rope-scaling: expected a JSON object"),
    (["--rope-scaling", '{"factor": 4}'], "argument --rope-scaling: --rope-scaling needs a rope_type"),
    (["--model", "/nonexistent/model-folder-xyz"], "argument --model:"),
    (["--api-server-count", "2"], "cab-serve runs one API server process"),
    (["--keep-alive-timeout", "0"], "argument --keep-alive-timeout: expected a whole number of seconds >= 1"),
], ids=["sparsity-above-1", "sparsity-negative", "sparsity-nan", "sparsity-text", "policy-unknown",
        "rope-not-json", "rope-not-object", "rope-no-type", "model-missing", "api-server-count", "keep-alive-0"])
def test_bad_flags_name_the_flag(capsys, argv, expected):
    err = parse_error(capsys, argv)
    assert expected in err, err


def test_bad_cab_environment_names_the_variable(capsys, monkeypatch):
    monkeypatch.setenv("CAB_DENSE_THRESHOLD", "lots")
    assert "CAB_DENSE_THRESHOLD='lots' is not a valid int" in parse_error(capsys, [])
    monkeypatch.setenv("CAB_DENSE_THRESHOLD", "1024")
    monkeypatch.setenv("CAB_POLICY", "bridges")
    assert "CAB_POLICY" in parse_error(capsys, [])


def test_defaults_and_cab_flags(model_dir):
    args, keys = cli.parse_args(["--sparsity", "0.75", "--policy", "streaming", "--api-key", "k1", "--port", "9"])
    assert os.environ["CAB_SPARSITY"] == "0.75" and os.environ["CAB_POLICY"] == "streaming"
    assert (args.sparsity, args.policy) == (0.75, "streaming")
    assert Path(args.model) == Path(model_dir) and args.served_model_name == ["smollm2-135m-instruct"]
    assert args.host == "127.0.0.1" and args.attention_backend == "CUSTOM" and args.port == 9
    assert keys == ["k1"] and args.api_key is None  # the key check is server.app's, not vLLM's
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        assert args.gpu_memory_utilization == cli.CPU_MEMORY_SHARE


def test_env_defaults_and_passthrough(monkeypatch, model_dir):
    monkeypatch.setenv("CAB_SPARSITY", "0.5")
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    args, keys = cli.parse_args(["--model", model_dir, "--served-model-name", "tiny", "--gpu-memory-utilization",
                                 "0.2", "--max-model-len", "4k", "--host", "0.0.0.0"])
    assert args.sparsity == 0.5 and args.policy == "cab"
    assert keys == ["from-env"] and "VLLM_API_KEY" not in os.environ
    assert args.served_model_name == ["tiny"] and args.gpu_memory_utilization == 0.2
    assert args.max_model_len == 4000 and args.host == "0.0.0.0"


def test_rope_scaling_merges_into_rope_parameters(model_dir):
    theta = json.loads((Path(model_dir) / "config.json").read_text())["rope_parameters"]["rope_theta"]
    lin = cli.rope_overrides(model_dir, {"type": "linear", "factor": 4.0}, {})
    assert lin == {"rope_parameters": {"rope_theta": theta, "rope_type": "linear", "factor": 4.0}}
    yarn = cli.rope_overrides(model_dir, {"rope_type": "yarn", "factor": 4}, {"foo": 1})
    assert yarn["rope_parameters"] == {"rope_theta": theta, "rope_type": "yarn", "factor": 4,
                                       "original_max_position_embeddings": 8192}
    assert yarn["max_position_embeddings"] == 32768 and yarn["foo"] == 1
    with pytest.raises(ValueError, match="not both"):
        cli.rope_overrides(model_dir, {"rope_type": "yarn", "factor": 4}, {"rope_parameters": {}})


def _engine_config(argv: list[str]):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args, _ = cli.parse_args(argv)
    return AsyncEngineArgs.from_cli_args(args).create_engine_config()


@pytest.mark.parametrize("rope", ['{"rope_type": "yarn", "factor": 4}', '{"rope_type": "linear", "factor": 4}'])
def test_rope_scaling_extends_max_model_len(rope):
    """vLLM accepts 32k on the 8k model once --rope-scaling extends it (the engine config, not an engine)."""
    cfg = _engine_config(["--max-model-len", "32768", "--rope-scaling", rope])
    assert cfg.model_config.max_model_len == 32768
    assert cfg.model_config.hf_config.rope_parameters["factor"] == 4


def test_max_model_len_beyond_the_model_is_explained():
    with pytest.raises(ValueError) as e:
        _engine_config(["--max-model-len", "32768"])
    msg = cli.explain_config_error(e.value, None)
    assert msg.startswith("--max-model-len 32768 is more than this model allows: 8192 tokens"), msg
    assert "--rope-scaling" in msg


def test_cab_serve_exits_with_a_clear_message():
    """The console script end to end: a too-long --max-model-len stops before the engine starts (exit 2)."""
    exe = Path(sys.executable).parent / "cab-serve"
    assert exe.exists(), "cab-serve console script missing: pip install -e '.[server]'"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAB_", "PROMETHEUS_"))}
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.run([str(exe), "--max-model-len", "65536", "--port", str(port)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "cab-serve: error: --max-model-len 65536 is more than this model allows: 8192 tokens" in p.stderr
    assert "Traceback" not in p.stderr


def test_cpu_turns_off_the_broken_aot_compile_cache(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    cli.cpu_compile_cache()
    assert os.environ.get("VLLM_USE_AOT_COMPILE") == ("0" if current_platform.is_cpu() else None)
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")  # the user's choice wins
    cli.cpu_compile_cache()
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"


def test_keep_alive_flag(monkeypatch, model_dir):
    monkeypatch.delenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", raising=False)
    args, _ = cli.parse_args([])
    assert cli.keep_alive_seconds(args) == cli.DEFAULT_KEEP_ALIVE == 75
    args, _ = cli.parse_args(["--keep-alive-timeout", "300"])
    assert cli.keep_alive_seconds(args) == 300
    monkeypatch.setenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "20")
    assert cli.keep_alive_seconds(cli.parse_args([])[0]) == 20


def test_cab_backend_runs_the_v1_model_runner_unless_the_user_chose(model_dir, monkeypatch):
    """CUDA vLLM 0.26+ defaults most models to Model Runner V2, which gives an attention backend no request ids:
    CAB would then ignore every request's fields. cab-serve picks V1 for its backend, keeps an explicit choice,
    and leaves other backends alone."""
    cli.parse_args(["--model", model_dir])
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    cli.parse_args(["--model", model_dir, "--attention-backend", "FLASH_ATTN"])
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    cli.parse_args(["--model", model_dir])
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"


def test_cab_backend_gets_cabs_scheduler_unless_the_user_chose(model_dir):
    """cab-serve with CAB as the backend schedules with CABScheduler (prefill chunks at CAB's blocks), which the
    engine config resolves to its class; an explicit --scheduler-cls and other backends keep theirs."""
    from cab_vllm.backend.scheduler import QUALNAME, CABScheduler

    args, _ = cli.parse_args(["--model", model_dir])
    assert args.scheduler_cls == QUALNAME
    assert _engine_config(["--model", model_dir]).scheduler_config.get_scheduler_cls() is CABScheduler
    args, _ = cli.parse_args(["--model", model_dir, "--scheduler-cls", "vllm.v1.core.sched.scheduler.Scheduler"])
    assert args.scheduler_cls == "vllm.v1.core.sched.scheduler.Scheduler"
    args, _ = cli.parse_args(["--model", model_dir, "--attention-backend", "FLASH_ATTN"])
    assert args.scheduler_cls is None
