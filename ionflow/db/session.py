"""Engines, sessions and schema migrations.

The schema comes from the Alembic migrations shipped in this package
(``alembic.ini`` and ``migrations/`` next to this file); :func:`upgrade` runs
them to the newest revision and is safe to call on every start.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

_HERE = Path(__file__).resolve().parent

#: Seconds a SQLite connection waits for another writer (several Prefect workers
#: may write at once) before it gives up with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30

# alembic keeps the running migration context in a module global, so two threads
# must not migrate at once; separate processes are serialised by env.py's lock
_UPGRADE_LOCK = threading.Lock()


def shown_url(url: str) -> str:
    """A database URL fit to print or store: any password replaced by ***."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_url(path: str | Path) -> str:
    """SQLAlchemy URL of a SQLite file (made absolute, so it does not depend on the cwd)."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL, or None for other databases and in-memory SQLite."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:") or u.query.get("mode") == "memory":
        return None
    return Path(db)


def _on_sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # first: every statement below (switching to WAL takes a lock) waits for other writers
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    # SQLite ignores foreign keys unless asked, per connection
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL lets the dashboard read while a flow writes. The mode is stored in the file, and
    # switching takes an exclusive lock that does not wait for busy writers: switch only once.
    cursor.execute("PRAGMA journal_mode")
    if str(cursor.fetchone()[0]).lower() != "wal":
        # another process may hold a lock right now (e.g. migrating); a later connection switches
        with contextlib.suppress(sqlite3.OperationalError):
            cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Engine for ``url``; for SQLite, foreign keys on, WAL, a 30 s busy timeout, parent folder created."""
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if (path := _sqlite_file(url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    event.listen(engine, "connect", _on_sqlite_connect)
    return engine


def read_only_engine(url: str) -> Engine:
    """An engine that cannot write to the database at ``url``, for commands that only read.

    SQLite: the file is opened with ``mode=ro`` (and ``PRAGMA query_only``), so reading never
    checkpoints the WAL into it or changes it in any other way; a file in a folder the user cannot
    write is opened as immutable. PostgreSQL: every transaction is ``READ ONLY``.
    FileNotFoundError for a SQLite file that does not exist (nothing is created).
    """
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        options = " ".join(filter(None, [u.query.get("options"), "-c default_transaction_read_only=on"]))
        return create_engine(u.update_query_dict({"options": options}), pool_pre_ping=True)
    path = _sqlite_file(url)
    if path is None:
        raise ValueError(f"{url}: a read-only view needs a SQLite file, not an in-memory database")
    if not path.is_file():
        raise FileNotFoundError(f"no database file {path}")
    uri = f"file:{path.resolve()}?mode=ro"
    try:
        sqlite3.connect(uri, uri=True).execute("SELECT 1 FROM sqlite_master").close()
    except sqlite3.OperationalError:
        uri += "&immutable=1"  # a folder the reader cannot write: no -shm file can be made

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
        connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        connection.execute("PRAGMA query_only=ON")
        return connection

    return create_engine("sqlite://", creator=connect)


def _alembic_config(url: str) -> Config:
    # config_file_name stays set (alembic reads the ini), but the packaged env.py
    # never calls logging.config.fileConfig, so the application's logging is untouched
    cfg = Config(str(_HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(_HERE / "migrations"))
    # ConfigParser treats % as interpolation; URL-encoded passwords contain it
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision`` (default: the newest); a no-op when already there."""
    if (path := _sqlite_file(url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    with _UPGRADE_LOCK:
        command.upgrade(_alembic_config(url), revision)
    if _sqlite_file(url) is not None:
        # one connection through make_engine leaves the file in WAL mode, so that writers
        # starting together later never race to switch it
        engine = make_engine(url)
        with engine.connect():
            pass
        engine.dispose()


def head_revision() -> str:
    """The newest schema revision this ionflow ships."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()


def schema_problem(engine: Engine) -> str | None:
    """Why a reader cannot use the database behind ``engine`` (no ionflow schema, or one older or
    newer than this ionflow's), or None. Reads only."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        found = MigrationContext.configure(connection).get_current_revision()
    head = head_revision()
    if found is None:
        return "it holds no ionflow database (no schema revision)"
    if found != head:
        return f"its schema is at revision {found}, this ionflow reads {head}: " + (
            "run `ionflow db upgrade TARGET` first" if found < head else "use the newer ionflow that wrote it"
        )
    return None


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at (None: no schema yet)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; rows stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def has_schema(engine: Engine) -> bool:
    """Whether the database already holds ionflow's tables (a campaign may have run in it)."""
    from sqlalchemy import inspect

    return "campaign" in inspect(engine).get_table_names()
