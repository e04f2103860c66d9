"""``ionflow db``: the provenance database's schema (upgrade, current revision)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ionflow.cli.common import (
    db_app,
    err,
    fail,
    load_campaign,
    shown_url,
)


def _database_url(target: str | None) -> str:
    """A URL given directly, the database of a campaign file, or IONFLOW_DATABASE_URL."""
    from ionflow.config import DATABASE_URL_VARIABLE

    if target is None:
        url = os.environ.get(DATABASE_URL_VARIABLE)
        if not url:
            fail(f"give a database URL or a campaign file, or set {DATABASE_URL_VARIABLE}")
        return url
    if "://" in target:
        return target
    path = Path(target)
    if path.is_dir():
        path = path / "ionflow.db"
    if path.suffix == ".db":
        from ionflow.db import sqlite_url

        return sqlite_url(path)
    return load_campaign(path).db_url


@db_app.command("upgrade")
def db_upgrade(
    target: str | None = typer.Argument(None, help="Database URL or campaign file (default: $IONFLOW_DATABASE_URL)."),
    revision: str = typer.Option("head", help="Alembic revision to migrate to."),
) -> None:
    """Create or migrate the provenance database's schema (SQLite or PostgreSQL); safe to repeat."""
    from sqlalchemy.exc import OperationalError

    from ionflow.db import current_revision, upgrade

    url = _database_url(target)
    try:
        before = current_revision(url)
        upgrade(url, revision)
        after = current_revision(url)
    except OperationalError as exc:
        fail(f"cannot reach {shown_url(url)}: {str(exc).splitlines()[0]}")
    err.print(
        f"[green]ok:[/] {shown_url(url)} at revision {after}"
        + ("" if before == after else f" (was {before or 'empty'})")
    )


@db_app.command("current")
def db_current(
    target: str | None = typer.Argument(None, help="Database URL or campaign file (default: $IONFLOW_DATABASE_URL)."),
) -> None:
    """Print the schema revision of the provenance database."""
    from ionflow.db import current_revision

    url = _database_url(target)
    typer.echo(current_revision(url) or "empty (run ionflow db upgrade)")
