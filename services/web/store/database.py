"""Open the web UI's database and bring its schema up to date.

SQLite (a file in WEB_DATA_DIR) unless DATABASE_URL names another database; PostgreSQL through
psycopg 3 for several web replicas. Every transaction on SQLite starts with ``BEGIN IMMEDIATE``: it
takes the write lock up front, so two processes never both read and then fail to write
("database is locked" half-way); readers are not blocked (WAL journal).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from services.web.errors import WebError

log = logging.getLogger("telechat.web")

DB_FILE = "telechat-web.db"
MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "web_schema_version"
# Seconds a SQLite writer waits for another one (each holds the lock for a few milliseconds).
SQLITE_BUSY_TIMEOUT_S = 30
_MIGRATION_LOCK = 7_190_019  # PostgreSQL advisory lock key: one migrating replica at a time


class StorageError(WebError):
    """The database cannot be opened or migrated; the message is one line (no password in it)."""


@dataclass(frozen=True)
class Database:
    """An open, migrated database: the engine, a session factory and how long a silent reply may live."""

    engine: Engine
    sessions: sessionmaker[Session]
    stale_reply_s: float = 70.0

    @property
    def url(self) -> str:
        """The URL with its password hidden (for messages)."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back if it raises."""
        with self.sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()


def database_url(url: str | None, data_dir: Path) -> URL:
    """The URL to open: ``url`` (``postgresql://`` and ``postgres://`` get the psycopg 3 driver) or, when
    unset, SQLite at ``data_dir/telechat-web.db``."""
    if not url:
        return URL.create("sqlite", database=str(Path(data_dir).expanduser() / DB_FILE))
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError("DATABASE_URL is not a database URL (e.g. postgresql://user:password@host/db)") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StorageError(f"DATABASE_URL: {parsed.get_backend_name()} is not supported; "
                           "use postgresql:// or sqlite://")
    return parsed


def open_database(url: URL, *, stale_reply_s: float = 70.0) -> Database:
    """Connect and migrate to the newest schema; raises StorageError with one line on failure."""
    shown = url.render_as_string(hide_password=True)
    try:
        engine = _engine(url)
    except (NoSuchModuleError, ArgumentError, ImportError) as e:
        raise StorageError(f"cannot use {shown}: {_first_line(e)}") from None
    try:
        migrate(engine)
    except (SQLAlchemyError, OSError) as e:
        engine.dispose()
        raise StorageError(f"cannot open the database {shown}: {_first_line(e)}") from None
    return Database(engine, sessionmaker(engine, expire_on_commit=False), stale_reply_s)


def _engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        folder = Path(url.database).parent
        if not folder.is_dir():
            folder.mkdir(parents=True, mode=0o700)  # chats are private: only the owner reads the folder
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # pysqlite's own BEGIN handling off: ours below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a killed process
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest migration (a no-op when it is there already). Safe when several
    processes start at once: SQLite's write lock or a PostgreSQL advisory lock lets one migrate at a time."""
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    if engine.url.get_backend_name() == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        os.chmod(engine.url.database, 0o600)


def alembic_config() -> Config:
    """Alembic's configuration for our migrations (no alembic.ini: the folder is all it needs)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("version_table", VERSION_TABLE)
    return config


def schema_version(engine: Engine) -> tuple[str | None, str]:
    """(the database's migration, the newest migration): equal once ``migrate`` ran."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()
    return current, head or ""


def _first_line(error: BaseException) -> str:
    """The driver's message, first line only (psycopg adds hints and SQL on further lines)."""
    if isinstance(error, SQLAlchemyError) and getattr(error, "orig", None) is not None:
        error = error.orig  # type: ignore[assignment]
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
