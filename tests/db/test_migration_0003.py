"""Migration 0003 upgrades, in place, a database that the release before it wrote.

``tests/data/release-0002.db`` is the database of a real two-iteration tblite campaign run by
ionflow at revision 0002 (held-out test frames, uncertainty selection, run folders kept). On
PostgreSQL its rows are copied into a schema migrated to 0002 first, then both are upgraded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ionflow.db import make_engine, session_factory, session_scope, upgrade
from ionflow.db.models import REASON_CODES
from ionflow.db.queries import iteration_table

RELEASE = Path(__file__).parents[1] / "data" / "release-0002.db"
#: Tables of revision 0002, parents first (the order rows can be copied in).
TABLES_0002 = (
    "campaign",
    "iteration",
    "structure",
    "calculation",
    "model",
    "model_training_member",
    "md_run",
    "campaign_structure",
    "selection_decision",
)


def released(url: str) -> None:
    """The release's database at ``url``: the file itself on SQLite, its rows on PostgreSQL."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(RELEASE, u.database)
        return
    upgrade(url, "0002")
    source, target = sa.create_engine(f"sqlite:///{RELEASE}"), make_engine(url)
    meta = sa.MetaData()
    meta.reflect(target, only=TABLES_0002)
    with source.connect() as src, target.begin() as dst:
        for name in TABLES_0002:
            table = meta.tables[name]
            rows = [
                dict(r._mapping) for r in src.execute(sa.select(sa.table(name, *[sa.column(c.name) for c in table.c])))
            ]
            for row in rows:  # SQLite hands back text for timestamps, JSON and booleans: let the types convert
                for column in table.c:
                    if isinstance(column.type, sa.JSON) and isinstance(row[column.name], str):
                        import json

                        row[column.name] = json.loads(row[column.name])
                    if isinstance(column.type, sa.DateTime) and isinstance(row[column.name], str):
                        from datetime import datetime

                        row[column.name] = datetime.fromisoformat(row[column.name])
            if rows:
                dst.execute(table.insert(), rows)
    source.dispose()
    target.dispose()


def test_a_database_of_the_previous_release_is_upgraded_in_place(url: str) -> None:
    released(url)
    upgrade(url)
    engine = make_engine(url)

    def q(sql: str) -> list:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).all()

    assert q("SELECT version_num FROM alembic_version") == [("0004",)]
    # nothing lost
    assert [tuple(r) for r in q("SELECT COUNT(*) FROM structure UNION ALL SELECT COUNT(*) FROM calculation")] == [
        (35,),
        (19,),
    ]
    decisions = q("SELECT iteration_id, chosen, reason_code, rank, reason FROM selection_decision ORDER BY id")
    assert len(decisions) == 24 and {d.reason_code for d in decisions} <= set(REASON_CODES)
    codes = [d.reason_code for d in decisions]
    assert (codes.count("held_out"), codes.count("uncertain"), codes.count("budget")) == (4, 6, 14)
    assert all(bool(d.chosen) == (d.reason_code == "uncertain") for d in decisions)
    for iteration_id in {d.iteration_id for d in decisions}:
        mine = [d for d in decisions if d.iteration_id == iteration_id and d.reason_code != "held_out"]
        assert sorted(d.rank for d in mine) == list(range(1, len(mine) + 1))
        # the uncertainty strategy takes the most uncertain first: the chosen hold the top ranks
        assert {d.rank for d in mine if d.chosen} == {1, 2, 3}
    assert all(d.rank is None for d in decisions if d.reason_code == "held_out")
    # run folders relative to the campaign folder; walkers' starts were not recorded
    run_dirs = [r[0] for r in q("SELECT run_dir FROM calculation")]
    assert all(d.startswith("dft/") for d in run_dirs), run_dirs[:3]
    assert {r[0] for r in q("SELECT start_origin FROM md_run")} == {"unknown"}
    assert {r[0] for r in q("SELECT md_step FROM campaign_structure")} == {None}
    selection = q('SELECT "index", selection_strategy, selection_threshold, selection_budget FROM iteration ORDER BY 1')
    assert [tuple(r) for r in selection] == [
        (0, None, None, None),
        (1, "uncertainty", 0.001, 3),
        (2, "uncertainty", 0.001, 3),
    ]

    with session_scope(session_factory(engine)) as session:
        rows = iteration_table(session, 1)
    for row in rows:
        assert all(not isinstance(v, (dict, list)) for v in row["metrics"].values())
        assert all(not isinstance(v, (dict, list)) for v in row["model_metrics"].values())
        assert not any(k.startswith(("test_forces", "current_test")) for k in row["metrics"])
        assert row["model_metrics"]["train_n_epochs"] in (5, 10)
        assert row["model_metrics"]["current_test_n_structures"] == 7
        assert row["model_metrics"]["test_forces_rmse_eV_per_A"] > 0
    assert [r["metrics"].get("test_set_n_structures") for r in rows] == [3, 5, 7]
    assert rows[2]["metrics"]["test_set_n_test-md"] == 4

    curve = q(
        "SELECT iteration_index, model_version, n_train_labels, n_valid_labels, n_test_structures, "
        "reference_calculations, test_forces_rmse_eV_per_A FROM ionflow_learning_curve ORDER BY iteration_index"
    )
    assert [tuple(r[:6]) for r in curve] == [(0, 0, 4, 2, 7, 9), (1, 1, 7, 2, 7, 14), (2, 2, 10, 2, 7, 19)]
    assert [r[6] for r in curve] == pytest.approx(
        [r["model_metrics"]["current_test_forces_rmse_eV_per_A"] for r in rows]
    )
    trained = q("SELECT origin, chosen_because FROM ionflow_training_set WHERE model_version = 2")
    assert sorted((o, c) for o, c in trained if o == "md") == [("md", "uncertain")] * 6
    assert q("SELECT COUNT(*) FROM ionflow_decisions")[0][0] == 24
    assert q("SELECT SUM(n_calculations) FROM ionflow_reference_cost")[0][0] == 19
    engine.dispose()


def test_the_migration_goes_down_and_up_again(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'ionflow.db'}"
    released(url)
    upgrade(url)
    from alembic import command

    from ionflow.db.session import _alembic_config

    command.downgrade(_alembic_config(url), "0002")
    engine = make_engine(url)
    assert "prefect_run" not in sa.inspect(engine).get_table_names()
    assert "reason_code" not in {c["name"] for c in sa.inspect(engine).get_columns("selection_decision")}
    engine.dispose()
    upgrade(url)


def test_reading_commands_ask_for_the_upgrade_of_an_older_database(tmp_path) -> None:
    from typer.testing import CliRunner

    from ionflow.cli import app

    path = tmp_path / "ionflow.db"
    released(f"sqlite:///{path}")
    before = path.read_bytes()
    for args in (
        ["status", str(tmp_path)],
        ["lineage", str(tmp_path)],
        ["export", "decisions", str(path)],
        ["ui", str(path)],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "revision 0002" in result.output and "ionflow db upgrade" in result.output
    assert path.read_bytes() == before  # read-only: not migrated behind the user's back
