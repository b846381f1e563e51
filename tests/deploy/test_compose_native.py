"""Run the compose `api` and `web` services natively, with the environment compose.yaml + .env give them.

No Docker engine here, so this is the closest check that the stack's commands, variables and health
checks fit together: container ports become free loopback ports, volumes become temp folders, and the
service name in API_URL becomes 127.0.0.1 (what Docker's DNS would resolve).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import BIN, REPO, free_ports, http_status, wait_until
from tests.deploy.test_static import exec_form

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def native(argv: list[str]) -> list[str]:
    """A container command line with this machine's Python / console scripts."""
    return [sys.executable, *argv[1:]] if argv[0] == "python" else [str(BIN / argv[0]), *argv[1:]]


class Service:
    """One compose service resolved for a native run."""

    def __init__(self, model: dict, name: str, ports: dict[str, int], volumes: dict[str, Path]):
        svc = model["services"][name]
        self.name = name
        dockerfile = REPO / svc["build"]["dockerfile"]
        self.argv = native((svc.get("entrypoint") or []) + (svc.get("command") or exec_form(dockerfile, "CMD")))
        self.healthcheck = native(svc["healthcheck"]["test"][1:])  # drop "CMD"
        container_port = str(svc["ports"][0]["target"])
        env = {}
        for key, value in (svc.get("environment") or {}).items():
            value = value or ""
            if value == container_port:
                value = str(ports[name])
            elif value == "0.0.0.0":
                value = "127.0.0.1"  # loopback only: a test must not listen on the network
            for service, port in ports.items():  # http://api:8070 → the native api port
                target = model["services"][service]["ports"][0]["target"]
                value = value.replace(f"//{service}:{target}", f"//127.0.0.1:{port}")
            for target, host in volumes.items():
                if value.startswith(target):
                    value = str(host) + value[len(target):]
            env[key] = value
        self.env = {k: v for k, v in os.environ.items() if k not in env} | env | {
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}

    def healthy(self) -> bool:
        return subprocess.run(self.healthcheck, env=self.env, capture_output=True, timeout=30).returncode == 0

    @contextlib.contextmanager
    def running(self, log: Path):
        with open(log, "wb") as out:
            proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_api_and_web_services_run_natively(compose_model, demo_model, tmp_path):
    from telechat.demo import DEMO_VERSION

    volumes = {}
    for service in ("api", "web"):
        for volume in compose_model["services"][service].get("volumes", []):
            volumes[volume["target"]] = tmp_path / volume["target"].strip("/").replace("/", "_")
            volumes[volume["target"]].mkdir(exist_ok=True)
    # The api keeps its demo model in the telechat-home volume; put a pre-built one there.
    home = next(host for target, host in volumes.items() if target.endswith(".cache/telechat-stack"))
    (home / f"demo-model-v{DEMO_VERSION}").symlink_to(demo_model, target_is_directory=True)
    ports = dict(zip(("api", "web"), free_ports(2)))
    api = Service(compose_model, "api", ports, volumes)
    web = Service(compose_model, "web", ports, volumes)
    api.env["TELECHAT_HOME"] = str(home)  # in the image the volume sits at the default ~/.cache/telechat-stack

    assert not api.healthy(), "the healthcheck must fail while nothing listens"
    api_log = tmp_path / "api.log"
    with api.running(api_log) as api_proc:
        wait_until(api.healthy, 240, "api healthcheck", (api_proc,))
        assert http_status(f"http://127.0.0.1:{ports['api']}/health") == 200
        with web.running(tmp_path / "web.log") as web_proc:
            wait_until(web.healthy, 120, "web healthcheck", (web_proc,))
            assert web.env["API_URL"] == f"http://127.0.0.1:{ports['api']}"
            _open_page_and_expect_api_call(f"http://127.0.0.1:{ports['web']}", api_log)


def _open_page_and_expect_api_call(url: str, api_log: Path) -> None:
    """A browser session makes the page run; it asks the API for its models at API_URL."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM:
        pytest.skip("chromium is not installed: cannot open the page")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            browser.new_page().goto(url)
            wait_until(lambda: "GET /v1/models" in api_log.read_text(errors="replace"), 60, "web → API request")
        finally:
            browser.close()
