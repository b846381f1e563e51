"""deploy.py: settings precedence, one-line errors, and a real launch stopped by SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

import deploy
from deploy_settings import Settings
from tests.deploy.conftest import REPO, free_ports, http_status, wait_until

LAUNCH_TIMEOUT_S = 240


def settings_for(argv: list[str], environ: dict[str, str]) -> Settings:
    return deploy.resolve_settings(deploy.parse_args(argv), environ)


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text("model_path: m\napi_port: 9001\nweb_port: 9002\ngpu_devices: '3'\nweb_host: 10.0.0.1\n")
    env = {"API_PORT": "9011", "WEB_HOST": "127.0.0.2", "CUDA_VISIBLE_DEVICES": ""}  # empty = unset
    s = settings_for(["--config", str(config), "--api-port", "9021"], env)
    assert (s.api_port, s.web_port, s.web_host, s.api_host) == (9021, 9002, "127.0.0.2", "0.0.0.0")
    assert s.gpu_devices == "3"
    assert s.model_path == str((tmp_path / "m").resolve()), "file paths are relative to the file"
    assert settings_for(["--config", str(config), "--gpu", "0,1"], env).gpu_devices == "0,1"


def test_defaults_without_a_config_file(monkeypatch, tmp_path):
    monkeypatch.setattr(deploy, "DEFAULT_CONFIG", tmp_path / "absent.yaml")
    assert settings_for([], {}) == Settings()
    assert (Settings().api_port, Settings().web_port, Settings().gpu_devices) == (8070, 8501, None)


@pytest.mark.parametrize("text, message", [("api_prot: 1\n", "unknown key 'api_prot'"),
                                           ("api_port: http\n", "invalid api_port .*'http' from .*deploy.yaml")])
def test_bad_config_file(tmp_path, text, message):
    config = tmp_path / "deploy.yaml"
    config.write_text(text)
    with pytest.raises(deploy.DeployError, match=message):
        settings_for(["--config", str(config)], {})


def run_deploy(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(REPO / "deploy.py"), "--no-install", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0]


def test_port_in_use_names_the_port_and_the_process():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (web_port,) = free_ports(1)
        done = run_deploy("--api-host", "127.0.0.1", "--api-port", str(port), "--web-port", str(web_port))
    assert_one_line_error(done, f"port {port} (API)", "in use", f"pid {os.getpid()}", "--api-port")


@pytest.mark.parametrize("make, needle", [(lambda d: d / "nope", "does not exist"),
                                          (lambda d: d, "config.json is missing")])
def test_bad_model_path(tmp_path, make, needle):
    done = run_deploy("--model-path", str(make(tmp_path)))
    assert_one_line_error(done, str(tmp_path), needle)


def test_missing_dependency_names_the_extra(tmp_path):
    """A Python without the project (the base interpreter of the venv) + --no-install → which extra."""
    base = getattr(sys, "_base_executable", None)
    if not base or subprocess.run([base, "-c", "import fastapi"], capture_output=True).returncode == 0:
        pytest.skip("no interpreter without the serve dependencies")
    done = run_deploy(python=base)
    assert_one_line_error(done, "missing dependency", "serve")


class Launch:
    """deploy.py as a user runs it, its output collected line by line."""

    def __init__(self, *args: str, argv: list[str] | None = None):
        cmd = argv or [sys.executable, str(REPO / "deploy.py"), "--no-install", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for child in psutil.Process().children(recursive=True):  # anything a failed test left behind
            if child.pid != self.proc.pid:
                child.kill()
        self.proc.wait()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_launch_with_demo_model_then_sigint_stops_everything(demo_model):
    api_port, web_port = free_ports(2)
    launch = Launch("--model-path", str(demo_model), "--gpu", "7", "--api-host", "127.0.0.1",
                    "--web-host", "127.0.0.1", "--api-port", str(api_port), "--web-port", str(web_port))
    try:
        wait_until(lambda: "Press Ctrl+C" in launch.output, LAUNCH_TIMEOUT_S, "launcher up", (launch.proc,))
        assert f"http://localhost:{api_port}/docs" in launch.output
        assert f"http://localhost:{web_port}" in launch.output
        assert http_status(f"http://127.0.0.1:{api_port}/docs") == 200
        assert http_status(f"http://127.0.0.1:{api_port}/ready") == 200
        assert http_status(f"http://127.0.0.1:{web_port}/_stcore/health") == 200
        children = launch.descendants()
        assert len(children) >= 2
        assert {c.environ().get("CUDA_VISIBLE_DEVICES") for c in children} == {"7"}, "--gpu reaches every child"

        launch.proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        assert launch.proc.wait(timeout=15) == 0
        assert time.monotonic() - start < 10, "stop took too long"
        assert all(gone(c.pid) for c in children), [c.pid for c in children if not gone(c.pid)]
    finally:
        launch.close()


FAKE_API = """
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        print("fake api:", *args, flush=True)
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok)
print("fake api: listening", flush=True)
server.serve_forever()
"""


def launch_with_fake_api() -> Launch:
    """deploy.py with a stand-in API (stdlib server) and the real web UI, on free loopback ports."""
    api_port, web_port = free_ports(2)
    code = ("import sys, deploy; "
            f"deploy.BACKENDS['native'] = lambda s: [sys.executable, '-c', {FAKE_API!r}, str(s.api_port)]; "
            f"sys.exit(deploy.main(['--no-install', '--api-host', '127.0.0.1', '--web-host', '127.0.0.1', "
            f"'--api-port', '{api_port}', '--web-port', '{web_port}']))")
    return Launch(argv=[sys.executable, "-c", code])


def test_dead_child_is_reported_and_the_other_stopped():
    """A stand-in API (stdlib server) is killed: the launcher names it, shows its log, stops the web UI."""
    launch = launch_with_fake_api()
    try:
        wait_until(lambda: "Press Ctrl+C" in launch.output, LAUNCH_TIMEOUT_S, "launcher up", (launch.proc,))
        api, *web = sorted(launch.descendants(), key=lambda p: p.create_time())
        api.kill()
        assert launch.proc.wait(timeout=15) == 1
        assert "error: the API exited with code -9" in launch.output
        assert "fake api:" in launch.output.split("error: the API exited")[1], "its last log lines are shown"
        assert all(gone(p.pid) for p in web)
    finally:
        launch.close()


def test_vllm_backend_settings_and_command(tmp_path, monkeypatch):
    """Backend and TP/PP come from flag > env > file; the vllm backend runs our launcher in .venv-vllm."""
    config = tmp_path / "deploy.yaml"
    config.write_text("backend: vllm\ntensor_parallel_size: 2\npipeline_parallel_size: 2\n")
    s = settings_for(["--config", str(config), "--pipeline-parallel-size", "4"], {"TENSOR_PARALLEL_SIZE": "8"})
    assert (s.backend, s.tensor_parallel_size, s.pipeline_parallel_size) == ("vllm", 8, 4)
    assert settings_for(["--config", str(config), "--backend", "native"], {"BACKEND": "vllm"}).backend == "native"
    with pytest.raises(deploy.DeployError, match="invalid tensor_parallel_size .*greater than or equal to 1"):
        settings_for(["--tensor-parallel-size", "0"], {})
    with pytest.raises(deploy.DeployError, match="invalid backend .*'tgi' from the environment"):
        settings_for([], {"BACKEND": "tgi"})
    python = tmp_path / ".venv-vllm" / "bin" / "python"
    monkeypatch.setattr(deploy.bootstrap, "VLLM_VENV", python.parents[1])
    with pytest.raises(deploy.DeployError, match="needs .venv-vllm"):
        deploy.BACKENDS["vllm"](s)
    python.parent.mkdir(parents=True)
    python.touch()
    cmd = deploy.BACKENDS["vllm"](s)
    assert cmd[:3] == [str(python), "-m", "telechat.vllm_plugin.serve"]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "8" and cmd[cmd.index("--pipeline-parallel-size") + 1] == "4"
    assert deploy.READY_PATHS["vllm"] == "/health"


def test_a_burst_of_signals_still_stops_cleanly():
    """Ctrl+C hammered (or a terminal and `timeout` both signalling): every signal after the first
    lands while the launcher handles one; it must neither deadlock nor crash, and stops once."""
    launch = launch_with_fake_api()
    try:
        wait_until(lambda: "Press Ctrl+C" in launch.output, LAUNCH_TIMEOUT_S, "launcher up", (launch.proc,))
        children = launch.descendants()
        end = time.monotonic() + 5
        while time.monotonic() < end and "stopped" not in launch.output:  # until the children are down
            launch.proc.send_signal(signal.SIGINT)
        assert launch.proc.wait(timeout=20) == 0, launch.output[-2000:]
        assert launch.output.count("SIGINT: stopping the services") == 1
        assert all(gone(c.pid) for c in children)
    finally:
        launch.close()


def test_shipped_config_validates_and_uses_every_visible_gpu(monkeypatch):
    """deploy_config.yaml holds only keys of the settings model and leaves the GPUs to the host."""
    monkeypatch.setattr(deploy, "DEFAULT_CONFIG", REPO / "deploy_config.yaml")
    s = settings_for([], {})
    assert s.gpu_devices is None, "no GPU pinned by default: a multi-GPU host uses all of them"
    assert deploy.gpu_note(s, None) == "on CPU: no NVIDIA GPU found"
    assert deploy.gpu_note(s, ["0", "1"]) == "on GPU 0 of 0,1 (all visible; the native engine uses one GPU)"
    vllm = settings_for(["--backend", "vllm", "--tensor-parallel-size", "2"], {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert deploy.gpu_note(vllm, ["0", "1", "2", "3"]) == "on 2 of the GPUs 2,3 (CUDA_VISIBLE_DEVICES)"


def test_port_owner_command_is_cut_between_arguments():
    args = ["/usr/bin/python3", "-m", "http.server", "--directory", "/srv/" + "x" * 80, "8070"]
    short = deploy._short_command(args)
    assert short == "/usr/bin/python3 -m http.server --directory ..."
    assert deploy._short_command(["/" + "y" * 150]) == "/" + "y" * 150, "one long argument stays whole"
