"""Shared fixtures. Reference files (official tokenizer, configs, SFT examples, golden logits) live in
tests/fixtures (README there); a missing one fails the test that needs it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# tests/vllm runs in its own venv (run_tests.py's vLLM lane); the main venv has no vLLM to run it with.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]

REPO = Path(__file__).resolve().parents[1]
REF = REPO / "tests" / "fixtures"
GOLDEN_DIR = REF / "golden"
TOKENIZER_12B = REF / "tokenizer-12b"
SFT_DATA = REF / "sft-data"


def telechat(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``telechat ARGS`` (``python -m telechat.cli``) from the repository root, without a ``MODEL_PATH`` from the
    caller's environment; its output captured as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MODEL_PATH", None)
    return subprocess.run([sys.executable, "-m", "telechat.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def fixture_file(path: Path) -> Path:
    """``path`` under tests/fixtures; the test fails (never skips) when it is missing."""
    if not path.exists():
        pytest.fail(f"test fixture missing: {path} (tests/fixtures/README.md says what belongs there)")
    return path


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The built-in demo model, built once per test session."""
    from telechat.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


@pytest.fixture(scope="session")
def tokenizer_12b_dir() -> Path:
    """The official TeleChat 12B tokenizer folder (tokenizer.model + configs)."""
    fixture_file(TOKENIZER_12B / "tokenizer.model")
    return TOKENIZER_12B


@pytest.fixture(scope="session")
def tokenizer_12b(tokenizer_12b_dir: Path):
    """The 12B tokenizer through AutoTokenizer (fast), no trust_remote_code."""
    import telechat  # noqa: F401  (registers the tokenizer classes)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_12b_dir))


@pytest.fixture(scope="session")
def tokenizer_12b_slow(tokenizer_12b_dir: Path):
    """The slow (sentencepiece) 12B tokenizer."""
    from telechat.tokenizer import TelechatTokenizer

    return TelechatTokenizer.from_pretrained(str(tokenizer_12b_dir))


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly trained demo (7B-style byte-level BPE) tokenizer folder."""
    from telechat.tokenizer import build_demo_tokenizer

    path = tmp_path_factory.mktemp("demo_tokenizer")
    build_demo_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def demo_tokenizer(demo_tokenizer_dir: Path):
    """The demo tokenizer loaded through AutoTokenizer."""
    import telechat  # noqa: F401
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_tokenizer_dir))


# ---------------------------------------------------------------------------------------------- API server

API_ENV = ("MODEL_PATH", "MODEL_NAME", "API_HOST", "API_PORT", "API_KEY", "CORS_ORIGINS", "DEVICE", "DTYPE",
           "MAX_MODEL_LEN", "MAX_NUM_SEQS", "MAX_QUEUE", "GPU_MEMORY_UTILIZATION", "LORA_PATH", "LORA_MODULES",
           "ENABLE_LORA", "MAX_LORAS", "MAX_LORA_RANK", "ROPE_MODE",
           "TRAINING_SEQLEN", "BASE_SEQLEN", "SHUTDOWN_GRACE_S", "LOG_LEVEL")
"""Settings variables of services/api; cleared for test servers so the developer's shell cannot leak in."""


class ServiceProcess:
    """A service subprocess on a free loopback port; its output goes to ``log_path``."""

    def __init__(self, proc, url: str, log_path: Path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log(self) -> str:
        """Everything the service printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, return the exit code (killed after ``timeout``)."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode



def free_port() -> int:
    """A loopback port nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(cmd: list[str], port: int, health_path: str, log_path: Path, env: dict[str, str],
                  timeout: float, what: str) -> ServiceProcess:
    """Start ``cmd`` (listening on ``port``) and return once ``health_path`` answers 200.

    Raises with the service's last output if it exits or stays unhealthy for ``timeout`` seconds.
    """
    import subprocess
    import time

    import httpx

    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    service = ServiceProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{service.log()[-3000:]}")
        try:
            if httpx.get(service.url + health_path, timeout=2).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    service.stop()
    raise RuntimeError(f"{what} not healthy after {timeout}s:\n{service.log()[-3000:]}")


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    """Factory: ``api_server(model_dir, *flags, env={...})`` starts the API on a free loopback port and
    returns a :class:`ServiceProcess` once ``/ready`` answers 200. Servers still running at the end of
    the session are stopped."""
    import sys

    started: list[ServiceProcess] = []

    def start(model_dir: Path, *flags: str, env: dict[str, str] | None = None, timeout: float = 180
              ) -> ServiceProcess:
        port = free_port()
        child_env = {k: v for k, v in os.environ.items() if k not in API_ENV}
        child_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
        cmd = [sys.executable, "-m", "services.api", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), *flags]
        log_path = tmp_path_factory.mktemp("api-server") / "server.log"
        server = start_service(cmd, port, "/ready", log_path, child_env, timeout, "API server")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
