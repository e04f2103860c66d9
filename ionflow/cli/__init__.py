"""The ``ionflow`` command: parse, check, call, print. One module per group of commands:
:mod:`~ionflow.cli.campaign` (validate, run, status, deploy), :mod:`~ionflow.cli.data` (train,
label), :mod:`~ionflow.cli.database` (db upgrade, db current), :mod:`~ionflow.cli.evaluate` (evaluate);
:mod:`~ionflow.cli.common` holds what they share."""

from __future__ import annotations

from ionflow.cli import campaign, data, database, evaluate, provenance  # noqa: F401  (each registers its commands on app)
from ionflow.cli.common import app, shown_url

__all__ = ["app", "main", "shown_url"]


def main() -> None:
    app()
