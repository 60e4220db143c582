"""The store's one engine and session factory: storage URLs, connection settings, schema revision.

Every query of the store runs in a session from :meth:`Database.session`, one short transaction
each. Write sessions start with ``BEGIN IMMEDIATE`` on SQLite, which takes the write lock up front
so a read-then-write transaction never fails with SQLITE_BUSY half way. A database opened
read-only refuses write sessions with :class:`StoreReadOnly`, and the server refuses writes too:
SQLite opens the file with ``mode=ro``, PostgreSQL runs every transaction READ ONLY.
"""

from __future__ import annotations

import ast
import functools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError
from sqlalchemy.orm import Session

from .errors import NoDatabaseFile, StorageOpenError, StoreReadOnly

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_ADVISORY_LOCK_KEY = 0x65766F6D  # "evom": serialises concurrent schema upgrades on PostgreSQL
_SQLITE_BUSY_TIMEOUT_MS = 30_000
_WRITE = "evomerge_write"  # execution option: this connection begins write transactions


@functools.cache
def migration_head() -> str:
    """The newest revision of the shipped migrations, read from their files' ``revision`` and
    ``down_revision`` (the one no other names as its parent): opening a store at head needs no Alembic,
    whose import costs a reader such as `evomerge status` a fifth of a second."""
    revs: dict[str, str | None] = {}
    for f in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        found: dict[str, Any] = {}
        for node in ast.parse(f.read_text()).body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
            if isinstance(target, ast.Name) and target.id in ("revision", "down_revision") and node.value is not None:
                found[target.id] = ast.literal_eval(node.value)
        if "revision" in found:
            revs[found["revision"]] = found.get("down_revision")
    parents = {p for p in revs.values() if p is not None}
    heads = sorted(set(revs) - parents)
    if len(heads) != 1:
        raise RuntimeError(f"the shipped migrations have {len(heads)} heads ({heads}); expected one")
    return heads[0]


def default_storage_url() -> str:
    """``$EVOMERGE_STORAGE`` if set, else ``sqlite:///<absolute path of ./evomerge.db>``."""
    env = os.environ.get("EVOMERGE_STORAGE", "").strip()
    if env:
        return env
    return "sqlite:///" + str(Path("evomerge.db").resolve())


def parse_url(url: str | URL) -> URL:
    """A storage URL as SQLAlchemy's URL, with PostgreSQL on psycopg (3); ValueError if unusable."""
    hint = "expected e.g. sqlite:///evomerge.db or postgresql+psycopg://user:password@host:5432/dbname"
    if not isinstance(url, (str, URL)) or not str(url).strip():
        raise ValueError(f"invalid storage URL {url!r}: {hint}")
    try:
        u = make_url(str(url).strip()) if isinstance(url, str) else url
    except ArgumentError:
        raise ValueError(f"invalid storage URL {str(url)!r}: {hint}") from None
    # "postgres://" is the Heroku-style scheme; psycopg (3) is the driver evomerge installs.
    if u.get_backend_name() == "postgres" or u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"unsupported storage URL {u.render_as_string(hide_password=True)!r}: "
            "evomerge supports sqlite:/// and postgresql+psycopg:// URLs"
        )
    return u


def _sqlite_read_only_url(u: URL, shown: str) -> URL:
    """The SQLite URL opened as a ``mode=ro`` URI, which never creates the file."""
    db = u.database or ""
    if u.query.get("uri") in ("true", "1"):  # already a URI filename: add the mode to it
        return u.update_query_dict({"mode": "ro"})
    if db in ("", ":memory:"):
        raise StorageOpenError(f"cannot open storage {shown} read-only: an in-memory database is empty")
    path = Path(db).resolve()
    if not path.is_file():
        raise NoDatabaseFile(f"cannot open storage {shown} read-only: no database file {path}", str(path))
    return u.set(database="file:" + quote(str(path)), query={**u.query, "mode": "ro", "uri": "true"})


def _configure_sqlite(engine: Engine, read_only: bool) -> dict[str, bool]:
    """Set up each connection; returns the switch that turns WAL on once the file is known to be ours."""
    # Switching the journal mode is a write: off while opening checks the file (another application's
    # database or a text file stays byte for byte as it was), and never for a reader, which follows the
    # file's mode.
    wal = {"on": False}

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event emit BEGIN itself (pysqlite's implicit BEGIN breaks
        # savepoints and cannot take the write lock up front).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            if wal["on"] and not read_only:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return wal


def _configure_postgresql_read_only(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        finally:
            cur.close()
        dbapi_conn.commit()  # SET is transactional on PostgreSQL: a later rollback would undo it


def _first_line(e: DatabaseError) -> str:
    text_ = str(e.orig if e.orig is not None else e).strip()
    return text_.splitlines()[0] if text_ else type(e).__name__


class Database:
    """One engine over one storage URL, its sessions and its schema revision.

    Opening brings the schema to the newest revision through the Alembic migrations in
    ``MIGRATIONS_DIR`` (``auto_upgrade=False`` refuses an old schema instead). A schema newer than
    this evomerge is always refused. ``read_only=True`` never creates, upgrades or writes anything:
    an old or missing schema is refused and a write raises :class:`StoreReadOnly`.
    """

    def __init__(
        self, url: str | URL, *, read_only: bool = False, auto_upgrade: bool = True, echo: bool = False
    ) -> None:
        self.url = parse_url(url)
        self.dialect = self.url.get_backend_name()
        self.read_only = bool(read_only)
        connect_url = self.url
        kwargs: dict[str, Any] = {"echo": echo}
        if self.dialect == "sqlite":
            if self.read_only:
                connect_url = _sqlite_read_only_url(self.url, self.url_display)
            kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            engine = create_engine(connect_url, **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError) as e:
            raise ValueError(f"invalid storage URL {self.url_display!r}: {e}") from None
        wal: dict[str, bool] = {}
        if self.dialect == "sqlite":
            wal = _configure_sqlite(engine, self.read_only)
        elif self.read_only:
            _configure_postgresql_read_only(engine)
        self.engine: Engine = engine
        self._write_engine: Engine = engine.execution_options(**{_WRITE: True})
        self._batch = threading.local()  # .session: the open batch's session, in the thread that opened it
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            #: the schema revision found on opening, before any automatic upgrade
            self.revision_at_open: str | None = self.current_revision()
            if self.revision_at_open is None:
                self._refuse_foreign_tables()
        except DatabaseError as e:  # unreachable, not a database (a text file as SQLite), corrupt
            engine.dispose()
            raise StorageOpenError(f"cannot open storage {self.url_display}: {_first_line(e)}") from None
        except BaseException:
            engine.dispose()
            raise
        if wal:  # the file is ours: from now on every connection runs in WAL mode
            engine.dispose()
            wal["on"] = True
        try:
            self._check_schema(auto_upgrade)
        except BaseException:
            engine.dispose()
            raise

    @property
    def url_display(self) -> str:
        """The URL with its password masked, for messages."""
        return self.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """A session in its own transaction, committed on leaving the block, rolled back on error."""
        if write and self.read_only:
            raise StoreReadOnly(f"storage {self.url_display} is open read-only; it cannot be changed")
        batch = getattr(self._batch, "session", None)
        if batch is not None:
            yield batch
            # Each call sees fresh rows, as in a session of its own: a bulk UPDATE of one call leaves the
            # objects another call loaded stale otherwise.
            batch.flush()
            batch.expunge_all()
            return
        with Session(self._write_engine if write else self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One write transaction for every store call of this thread inside the block (nested blocks
        join the outer one): committed when the block ends, rolled back whole if it raises. The study
        loop writes a turn's results, dispatches and checkpoint in one commit instead of one each."""
        if getattr(self._batch, "session", None) is not None:
            yield
            return
        if self.read_only:
            raise StoreReadOnly(f"storage {self.url_display} is open read-only; it cannot be changed")
        with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            self._batch.session = s
            try:
                yield
            finally:
                self._batch.session = None

    # ---------------------------------------------------------------------------- schema

    def alembic_config(self) -> Config:
        from alembic.config import Config  # Alembic only to change or inspect migrations, not to read

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option(
            "sqlalchemy.url", self.url.render_as_string(hide_password=False).replace("%", "%%")
        )
        return cfg

    def head_revision(self) -> str:
        return migration_head()

    def current_revision(self) -> str | None:
        """The schema revision recorded in ``alembic_version`` (None for an empty database)."""
        with self.engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        if len(rows) > 1:
            raise StorageOpenError(f"storage {self.url_display} records {len(rows)} schema revisions: {rows}")
        return rows[0] if rows else None

    def _refuse_foreign_tables(self) -> None:
        """An unversioned database with tables is another application's: never write evomerge's into it."""
        with self.engine.connect() as conn:
            # alembic_version alone is an evomerge database downgraded to nothing
            tables = sorted(set(inspect(conn).get_table_names()) - {"alembic_version"})
        if tables:
            shown = ", ".join(tables[:3]) + (", ..." if len(tables) > 3 else "")
            raise StorageOpenError(
                f"cannot open storage {self.url_display}: it holds tables ({shown}) but no evomerge schema; "
                "point --storage at a new file or an evomerge database"
            )

    def _known_revision(self, rev: str) -> bool:
        from alembic.script import ScriptDirectory  # only for a database not at head

        try:
            return ScriptDirectory.from_config(self.alembic_config()).get_revision(rev) is not None
        except Exception:
            return False

    def _check_schema(self, auto_upgrade: bool) -> None:
        current, head = self.revision_at_open, self.head_revision()
        if current == head:
            return
        if current is not None and not self._known_revision(current):
            raise StorageOpenError(
                f"storage {self.url_display} has schema revision {current}, newer than this evomerge "
                f"knows (head {head}); upgrade evomerge"
            )
        if self.read_only and current is None:
            raise StorageOpenError(f"storage {self.url_display} holds no evomerge schema (nothing to read)")
        if self.read_only or not auto_upgrade:
            raise StorageOpenError(
                f"storage {self.url_display} has schema revision {current or 'none'}, this evomerge needs "
                f"{head}; run `evomerge storage upgrade`"
            )
        self.upgrade()

    def upgrade(self) -> tuple[str | None, str]:
        """Apply the Alembic migrations up to head; a no-op at head. Returns (before, after)."""
        if self.read_only:
            raise StoreReadOnly(f"storage {self.url_display} is open read-only; its schema cannot be upgraded")
        # Alembic runs the migrations: only an upgrade imports it
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        cfg = self.alembic_config()
        with self._write_engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
            before = MigrationContext.configure(conn).get_current_revision()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            after = MigrationContext.configure(conn).get_current_revision()
        if before != after:
            log.info("storage %s upgraded from %s to %s", self.url_display, before or "empty", after)
        return before, after  # type: ignore[return-value]
