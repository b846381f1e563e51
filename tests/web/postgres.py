"""A throwaway PostgreSQL cluster from Debian's package, for the storage tests.

``initdb`` into a fresh folder, ``pg_ctl start`` listening only on a unix socket in that folder (no TCP
port, nothing reachable from outside), trust authentication for the socket. PostgreSQL refuses to run
as root, so under root (CI) the cluster runs as ``nobody`` through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import free_port

SEARCH = ("/usr/lib/postgresql/*/bin",)
RUN_AS = "nobody"


def find_bin_dir() -> Path | None:
    """The newest installed server's bin folder (Debian: /usr/lib/postgresql/VERSION/bin)."""
    found = sorted((p for pattern in SEARCH for p in Path("/").glob(pattern.lstrip("/")) if (p / "initdb").is_file()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


class PostgresCluster:
    """One running cluster; ``url`` is a SQLAlchemy URL to its ``postgres`` database."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        # Not pytest's tmp_path: under root that sits in a 0700 folder that `nobody` cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="telechat-pg-"))
        self.data, self.socket_dir = self.root / "data", self.root / "socket"
        self.port = free_port()  # only names the socket file (.s.PGSQL.PORT)
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._prefix = ["runuser", "-u", RUN_AS, "--"]
        self.url = f"postgresql+psycopg://postgres@/postgres?host={self.socket_dir}&port={self.port}"

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._prefix, *argv], capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> PostgresCluster:
        self._run("mkdir", "-m", "700", str(self.socket_dir))
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-locale", "--no-sync")
        options = (f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' -p {self.port} "
                   "-c fsync=off -c max_connections=40")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                  str(self.root / "server.log"), "-w", "-t", "60", "start")
        return self

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop the server (fast: open connections are cut) and remove its files."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
