"""`telechat web add-user` and `telechat web backup` on SQLite: once each as a user runs them (a subprocess
with a pipe on stdin), and the mistakes through the same entry point in-process (one line, exit code 2)."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from services.web import launch
from services.web.settings import StorageSettings
from services.web.store import open_from_settings, users
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _no_storage_env(monkeypatch):
    for name in ("DATABASE_URL", "WEB_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def _run(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WEB_DATA_DIR")}
    return subprocess.run([sys.executable, "-m", "services.web", *args, "--data-dir", str(data_dir)], cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=120, env=environ)


def _fails(capsys, monkeypatch, data_dir: Path, *args: str, stdin: str = "", needle: str) -> None:
    """The command fails with exit code 2 and one line on stderr containing ``needle``."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert launch.main([*args, "--data-dir", str(data_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_add_user_reads_the_password_from_stdin_and_refuses_mistakes(tmp_path, capsys, monkeypatch):
    done = _run(tmp_path, "add-user", "alice", stdin="correct horse battery\n")
    assert done.returncode == 0 and "'alice' can log in" in done.stdout, done.stderr
    db = open_from_settings(StorageSettings(web_data_dir=tmp_path))
    assert users.check_password(db, "alice", "correct horse battery") is not None
    db.close()
    _fails(capsys, monkeypatch, tmp_path, "add-user", "alice", stdin="another password\n", needle="exists already")
    _fails(capsys, monkeypatch, tmp_path, "add-user", "bob", stdin="short\n", needle="at least 8")
    _fails(capsys, monkeypatch, tmp_path, "add-user", "bob smith", stdin="long enough\n", needle="invalid user name")
    _fails(capsys, monkeypatch, tmp_path, "add-user", needle="name")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw-9@127.0.0.1:1/db")
    _fails(capsys, monkeypatch, tmp_path, "add-user", "bob", stdin="long enough\n", needle="cannot open the database")


def test_backup_copies_the_database_while_it_is_open(tmp_path, capsys, monkeypatch):
    db = open_from_settings(StorageSettings(web_data_dir=tmp_path / "data"))  # held open, like a running page
    users.add_user(db, "alice", "alice-password")
    copy = tmp_path / "backup.db"
    done = _run(tmp_path / "data", "backup", str(copy))
    assert done.returncode == 0, done.stderr
    users.add_user(db, "bob", "bob-password")
    db.close()
    with sqlite3.connect(copy) as backup:
        assert [r[0] for r in backup.execute("SELECT name FROM users")] == ["alice"]
    assert copy.stat().st_mode & 0o077 == 0, "the copy is as private as the database"
    _fails(capsys, monkeypatch, tmp_path / "data", "backup", str(copy), needle="exists already")
    _fails(capsys, monkeypatch, tmp_path / "empty", "backup", str(tmp_path / "x.db"), needle="no database")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    _fails(capsys, monkeypatch, tmp_path / "data", "backup", str(tmp_path / "y.db"), needle="pg_dump")


@pytest.mark.parametrize("command", ["add-user", "backup"])
def test_sub_command_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        launch.main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--data-dir" in out and "--database-url" in out
