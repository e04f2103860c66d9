"""Alembic environment for ionflow's packaged migrations.

The database URL comes from the Alembic config's ``sqlalchemy.url`` (set by
:func:`ionflow.db.session.upgrade`) or from ``-x url=...`` on the command line.
Logging is deliberately not configured here: ionflow runs migrations inside
applications (CLI, Prefect workers) whose logging is theirs.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, Engine, create_engine, event, pool, text

from ionflow.db.models import Base

target_metadata = Base.metadata

#: Any fixed 64-bit number: PostgreSQL advisory lock that serialises concurrent upgrades.
_PG_LOCK_KEY = 0x10F10_0001


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url") or context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise RuntimeError("no database URL: call ionflow.db.upgrade(url), or pass -x url=... to alembic")
    return url


def _configure(**kwargs: Any) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade --sql``)."""
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, poolclass=pool.NullPool)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, connection_record: Any) -> None:
        # let SQLAlchemy emit BEGIN itself, so that DDL is transactional on SQLite too
        dbapi_connection.isolation_level = None
        # batch mode copies, drops and renames tables; enforced foreign keys would
        # turn the drop of a referenced table into deletes of its children's rows
        dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        dbapi_connection.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock before the version table is read, so a
        # second process upgrading at the same time waits and then finds nothing to do
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def run_migrations_online() -> None:
    url = _url()
    sqlite = url.startswith("sqlite")
    engine = _sqlite_engine(url) if sqlite else create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _configure(connection=connection, render_as_batch=sqlite)
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    lock = text("SELECT pg_advisory_xact_lock(CAST(:key AS BIGINT))")
                    connection.execute(lock, {"key": _PG_LOCK_KEY})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
