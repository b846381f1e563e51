"""bootstrap.ensure_env on a tiny stand-in project: venv created, installed once, command re-run in it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from tests.deploy.conftest import REPO

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "telechat-stack"
version = "0.0.1"

[project.optional-dependencies]
x = []

[tool.setuptools]
packages = ["standin"]
"""

SCRIPT = """\
import sys
from bootstrap import ensure_env
ensure_env(["x"])
print("running in", sys.prefix, sys.argv[1:])
"""


def test_ensure_env_installs_once_and_reruns_the_command(tmp_path):
    base = getattr(sys, "_base_executable", None)
    if not base or base == sys.executable:
        pytest.skip("needs the interpreter the venv was made from")
    shutil.copy(REPO / "bootstrap.py", tmp_path)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "standin").mkdir()
    (tmp_path / "standin" / "__init__.py").write_text("")
    (tmp_path / "run.py").write_text(SCRIPT)
    venv = tmp_path / ".venv"

    def run(*args: str) -> list[str]:
        done = subprocess.run([base, "run.py", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.splitlines()

    first = run("a", "b")
    assert [line.split(" ", 2)[1] for line in first[:3]] == ["creating", "installing", "restarting"]
    assert first[-1] == f"running in {venv} ['a', 'b']"
    stamp = json.loads((venv / "telechat-bootstrap.json").read_text())
    assert stamp == {"pyproject": hashlib.sha256((tmp_path / "pyproject.toml").read_bytes()).hexdigest(),
                     "extras": ["x"]}

    second = run("c")
    assert second == [f"bootstrap: restarting with {venv}/bin/python", f"running in {venv} ['c']"]

    with open(tmp_path / "pyproject.toml", "a") as f:
        f.write("# changed\n")
    check = "import bootstrap; print(bootstrap._outdated(['x']), bootstrap._outdated([]))"
    done = subprocess.run([str(venv / "bin/python"), "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert done.stdout.split() == ["True", "True"], "a changed pyproject.toml means a reinstall"
