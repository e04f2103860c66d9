"""The six provenance questions, each answered by one command or view on a real campaign database,
on SQLite and on PostgreSQL (IONFLOW_TEST_POSTGRES_URL), through the real ``ionflow`` CLI:

1. which calculations trained a model, and how many came from bootstrap vs selection (lineage);
2. every candidate of an iteration with its score, chosen or not and why (export decisions);
3. a model's lineage: parents, hyper-parameters, metrics, checkpoint and verified sha256;
4. the MD run and step that produced a chosen frame (lineage, ionflow_training_set);
5. the reference cost and learning curve (views, status --json);
6. an earlier model's training set as extxyz, the decisions as CSV and Parquet (export).
Reading never writes: status, lineage and export open the database read-only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from ionflow.cli import app
from ionflow.db import (
    Calculation,
    CampaignStructure,
    Iteration,
    MDRun,
    Model,
    SelectionDecision,
    TrainingMember,
    session_scope,
)
from ionflow.db.models import PrefectRun
from ionflow.db.views import cased
from ionflow.platform.structures import read_structures

from .conftest import PROVENANCE, tiny_campaign, write_campaign

POSTGRES_URL = os.environ.get("IONFLOW_TEST_POSTGRES_URL")
SAMPLE_EVERY = 5


@pytest.fixture(
    scope="module",
    params=[
        "sqlite",
        pytest.param(
            "postgresql", marks=pytest.mark.skipif(not POSTGRES_URL, reason="IONFLOW_TEST_POSTGRES_URL is not set")
        ),
    ],
)
def campaign(request, tmp_path_factory):
    """A finished three-iteration campaign (one held-out MD frame per iteration) and its context:
    the session's SQLite one (``finished_campaign``), or the same campaign on PostgreSQL."""
    if request.param == "sqlite":
        yield request.getfixturevalue("finished_campaign")
        return
    request.getfixturevalue("prefect_server")
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context

    tmp = tmp_path_factory.mktemp("provenance-postgresql")
    schema = f"ionflow_prov_{uuid.uuid4().hex[:10]}"
    with create_engine(POSTGRES_URL).begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    path = write_campaign(tmp, tiny_campaign(tmp, database_url=url.render_as_string(hide_password=False), **PROVENANCE))
    summary = campaign_flow(str(path))
    ctx = context(str(path.resolve()))
    yield {"path": path, "ctx": ctx, "summary": summary, "backend": "postgresql", "tmp": tmp}
    ctx.sessions.kw["bind"].dispose()
    with create_engine(POSTGRES_URL).begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def ionflow(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (args, result.output, result.exception)
    return result.output


def test_lineage_names_every_label_with_its_calculation_md_run_and_step(campaign):
    """Questions 1, 3 and 4: one command."""
    path, ctx = campaign["path"], campaign["ctx"]
    info = json.loads(ionflow("lineage", path, "--model", "v2", "--json"))
    assert info["version"] == 2 and [p["version"] for p in info["parents"]] == [1, 0]
    assert info["checkpoint_check"] == "verified"
    assert info["file_provenance"]["training_set_sha256"] == info["training_set_sha256"]
    assert info["file_provenance"]["parent_version"] == 1 and info["file_provenance"]["campaign"] == "tiny"
    assert info["metrics"]["test_forces_rmse_eV_per_A"] > 0 and "test" not in info["metrics"]
    with session_scope(ctx.sessions) as s:
        model = s.scalar(select(Model).where(Model.version == 2))
        expected = {
            calc.id: (calc.adapter, calc.wall_time_s, member.split)
            for member, calc in s.execute(
                select(TrainingMember, Calculation)
                .join(Calculation, Calculation.id == TrainingMember.calculation_id)
                .where(TrainingMember.model_id == model.id)
            )
        }
        chosen = s.scalar(
            select(SelectionDecision.id).join(Iteration).where(Iteration.campaign_id == model.campaign_id).limit(1)
        )
    assert {m["calculation_id"]: (m["adapter"], m["wall_time_s"], m["split"]) for m in info["members"]} == expected
    assert chosen is not None
    by_origin = {(c["origin"], c["chosen_because"]): 0 for c in info["counts"]}
    for c in info["counts"]:
        by_origin[(c["origin"], c["chosen_because"])] += c["n"]
    assert by_origin == {("initial", "-"): 6, ("md", "uncertain"): 6}  # bootstrap, then 3 chosen per iteration
    for m in info["members"]:
        assert m["status"] == "ok" and m["code_version"].startswith("tblite")
        assert m["run_dir"].startswith("dft/") and (ctx.folder / m["run_dir"] / "result.json").is_file()
        if m["origin"] == "md":  # the run and step it was sampled at, and the decision that chose it
            assert m["md_run_id"] is not None and m["md_step"] % SAMPLE_EVERY == 0 and m["md_step"] > 0
            assert m["chosen_because"] == "uncertain" and m["rank"] >= 1 and m["score_eV_per_A"] > 0
            frames = read_structures(ctx.folder / _trajectory(ctx, m["md_run_id"]))
            assert m["structure_hash"] in {_hash(f) for f in frames if f.info["md_step"] == m["md_step"]}
        else:
            assert m["md_run_id"] is None and m["iteration_index"] == 0
    text_out = ionflow("lineage", path, "--model", "v2")
    assert "verified" in text_out and "v1 <- v0" in text_out
    rows = list(csv.DictReader(io.StringIO(ionflow("lineage", path, "--model", "v2", "--csv"))))
    assert sorted(int(r["calculation_id"]) for r in rows) == sorted(expected)


def _trajectory(ctx, md_run_id: int) -> str:
    with session_scope(ctx.sessions) as s:
        return s.get(MDRun, md_run_id).trajectory_path


def _hash(atoms) -> str:
    from ionflow.platform.structures import structure_hash

    return structure_hash(atoms)


def test_the_model_file_says_where_it_came_from_without_a_database(campaign):
    ctx = campaign["ctx"]
    info = json.loads(ionflow("lineage", ctx.folder / "models" / "model-v1.pt", "--json"))
    assert (info["campaign"], info["version"], info["parent_version"]) == ("tiny", 1, 0)
    assert len(info["training_set_sha256"]) == 64 and info["ionflow_version"]
    with session_scope(ctx.sessions) as s:
        assert info["sha256"] == s.scalar(select(Model.checkpoint_sha256).where(Model.version == 1))


def test_decisions_export_every_candidate_with_its_reason(campaign, tmp_path):
    """Question 2 (and 6: CSV and Parquet)."""
    path, ctx = campaign["path"], campaign["ctx"]
    rows = list(csv.DictReader(io.StringIO(ionflow("export", "decisions", path, "--iteration", "1"))))
    with session_scope(ctx.sessions) as s:
        decided = s.execute(
            select(SelectionDecision.structure_id, SelectionDecision.chosen, SelectionDecision.reason_code)
            .join(Iteration)
            .where(Iteration.index == 1)
        ).all()
    assert {(int(r["structure_id"]), r["reason_code"]) for r in rows} == {(i, c) for i, _, c in decided}
    assert {"score_eV_per_A", "threshold_eV_per_A", "rank", "md_step", "md_run_id"} <= set(rows[0])
    codes = [r["reason_code"] for r in rows]
    assert codes.count("uncertain") == 3 and codes.count("held_out") == 1
    ranked = sorted(int(r["rank"]) for r in rows if r["rank"])
    assert ranked == list(range(1, len(rows)))  # every frame but the held-out one, in the strategy's order
    import pyarrow.parquet as pq

    ionflow("export", "decisions", path, "-o", tmp_path / "d.parquet")
    table = pq.read_table(tmp_path / "d.parquet")
    assert table.num_rows == len(rows) * 2 and "score_eV_per_A" in table.column_names
    for name in ("calculations", "md-runs", "models"):
        out = tmp_path / f"{name}.csv"
        ionflow("export", name, path, "-o", out)
        assert len(list(csv.DictReader(out.open()))) > 0
    models = list(csv.DictReader((tmp_path / "models.csv").open()))
    assert [m["version"] for m in models] == ["0", "1", "2"] and "metric_test_forces_rmse_eV_per_A" in models[0]
    runs = list(csv.DictReader((tmp_path / "md-runs.csv").open()))
    # a walker that ran to completion goes on from its last frame in the next iteration
    later = [r for r in runs if r["iteration_index"] == "2"]
    assert all(r["start_origin"] in ("previous_run", "rattle") for r in later)
    assert any(r["start_origin"] == "previous_run" and r["start_md_run_id"] for r in later)


def test_an_earlier_model_s_training_set_exports_as_extxyz(campaign, tmp_path):
    """Question 6."""
    path, ctx = campaign["path"], campaign["ctx"]
    ionflow("export", "dataset", path, "--model", "v1", "--split", "train", "-o", tmp_path / "v1.extxyz")
    frames = read_structures(tmp_path / "v1.extxyz")
    with session_scope(ctx.sessions) as s:
        model = s.scalar(select(Model).where(Model.version == 1))
        energies = dict(
            s.execute(
                select(Calculation.id, Calculation.energy)
                .join(TrainingMember, TrainingMember.calculation_id == Calculation.id)
                .where(TrainingMember.model_id == model.id, TrainingMember.split == "train")
            ).all()
        )
    assert sorted(a.info["calculation_id"] for a in frames) == sorted(energies)
    for atoms in frames:
        assert atoms.info["split"] == "train" and atoms.info["model_version"] == 1
        assert atoms.info["REF_energy"] == pytest.approx(energies[atoms.info["calculation_id"]])
        assert atoms.info["origin"] in ("initial", "md") and "structure_hash" in atoms.info
        if atoms.info["origin"] == "md":
            assert atoms.info["iteration"] == 1 and atoms.info["md_step"] % SAMPLE_EVERY == 0
    ionflow("export", "dataset", path, "--model", "v1", "--split", "test", "-o", tmp_path / "t.extxyz")
    assert len(read_structures(tmp_path / "t.extxyz")) == 3 + 1  # bootstrap rattles + iteration 1's held-out frame
    err = ionflow("export", "dataset", path, "--model", "v7", "-o", tmp_path / "x.extxyz", code=2)
    assert "no model v7" in err and "v0, v1, v2" in err
    assert "--split 'tests'" in ionflow("export", "dataset", path, "--split", "tests", "-o", tmp_path / "x", code=2)


def test_learning_curve_and_reference_cost_views(campaign):
    """Question 5: views (SQL) and ``status --json``."""
    path, ctx = campaign["path"], campaign["ctx"]
    status = json.loads(ionflow("status", path, "--json"))
    with session_scope(ctx.sessions) as s:
        curve = s.execute(text("SELECT * FROM ionflow_learning_curve ORDER BY iteration_index")).mappings().all()
        curve = [cased(dict(r)) for r in curve]  # PostgreSQL folds unquoted names to lower case
        cost = s.execute(text("SELECT * FROM ionflow_reference_cost")).mappings().all()
        n_calculations = s.scalar(select(text("COUNT(*)")).select_from(Calculation))
        cpu = s.scalar(select(text("SUM(COALESCE(cpu_time_s, wall_time_s))")).select_from(Calculation))
    assert [r["iteration_index"] for r in curve] == [0, 1, 2] and [r["model_version"] for r in curve] == [0, 1, 2]
    assert [r["n_train_labels"] + r["n_valid_labels"] for r in curve] == [
        r["n_training_labels"] for r in status["iterations"]
    ]
    assert [r["reference_cpu_s"] for r in curve] == pytest.approx([r["reference_cpu_s"] for r in status["iterations"]])
    assert curve[-1]["reference_calculations"] == n_calculations == sum(r["n_calculations"] for r in cost)
    assert sum(r["cpu_or_wall_time_s"] for r in cost) == pytest.approx(cpu)
    assert all(r["n_test_structures"] == 3 + 2 for r in curve)  # every model on the final test set
    forces = [r["model_metrics"]["current_test_forces_rmse_eV_per_A"] for r in status["iterations"]]
    assert [r["test_forces_rmse_eV_per_A"] for r in curve] == pytest.approx(forces)
    assert status["calculations"] == {"ok": n_calculations}


def test_flow_and_task_runs_are_kept_with_their_iterations(campaign):
    ctx = campaign["ctx"]
    with session_scope(ctx.sessions) as s:
        runs = s.scalars(select(PrefectRun).order_by(PrefectRun.id)).all()
        iterations = s.scalars(select(Iteration).order_by(Iteration.index)).all()
        flows = [r for r in runs if r.kind == "flow"]
        assert len(flows) == 1 and flows[0].state == "COMPLETED" and flows[0].ended_at is not None
        tasks = [r for r in runs if r.kind == "task"]
        assert all(r.state == "COMPLETED" and r.flow_run_id == flows[0].run_id for r in tasks)
        assert all(r.api_url and r.api_url.startswith("http://127.0.0.1") for r in runs)
        steps = {(r.iteration.index, r.name.split(" · ")[0]) for r in tasks}
        assert {(0, "bootstrap"), (1, "explore"), (1, "select"), (2, "train"), (2, "evaluate")} <= steps
        # task runs say what they did: step, iteration and amount of work
        assert any(r.name == "label · iteration 1 · 4 structures" for r in tasks), [r.name for r in tasks]
        assert any(r.name == "explore · iteration 2 · 2 walkers" for r in tasks)
        assert all(it.prefect_flow_run_id == flows[0].run_id for it in iterations)
        assert all(it.selection_strategy == "uncertainty" for it in iterations[1:])
        members = s.scalars(select(CampaignStructure).where(CampaignStructure.origin.in_(("md", "test-md")))).all()
        assert members and all(m.md_step is not None and m.md_run_id is not None for m in members)


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_reading_commands_never_write(campaign, tmp_path):
    """On SQLite the file is byte for byte the same after status, lineage and export (no WAL
    checkpoint); on PostgreSQL the session refuses writes. ``db shell`` is read-only too."""
    path, ctx = campaign["path"], campaign["ctx"]
    if campaign["backend"] == "sqlite":
        db = ctx.folder / "ionflow.db"
        before = _fingerprint(db)
        ionflow("status", ctx.folder)
        ionflow("status", path, "--json")
        ionflow("lineage", ctx.folder, "--model", "v0")
        ionflow("export", "decisions", path)
        ionflow("export", "dataset", ctx.folder, "-o", tmp_path / "all.extxyz")
        assert _fingerprint(db) == before
        target = str(ctx.folder)
    else:
        from ionflow.db.session import read_only_engine

        with read_only_engine(ctx.config.db_url).connect() as conn, pytest.raises(Exception, match="read-only"):
            conn.execute(text("DELETE FROM prefect_run"))
        target = ctx.config.db_url
    if shutil.which("sqlite3" if campaign["backend"] == "sqlite" else "psql") is None:
        pytest.fail("db shell needs sqlite3 / psql: .ci/run installs them")
    shell = [sys.executable, "-m", "ionflow.cli", "db", "shell", target]
    count = subprocess.run(shell, input="SELECT COUNT(*) FROM ionflow_decisions;\n", capture_output=True, text=True)
    with session_scope(ctx.sessions) as s:
        assert str(s.scalar(select(text("COUNT(*)")).select_from(SelectionDecision))) in count.stdout, count
    write = subprocess.run(shell, input="DELETE FROM prefect_run;\n", capture_output=True, text=True)
    assert "read" in (write.stdout + write.stderr).lower() and "only" in (write.stdout + write.stderr).lower()
    with session_scope(ctx.sessions) as s:
        assert s.scalar(select(text("COUNT(*)")).select_from(PrefectRun)) > 0


def test_a_moved_campaign_folder_still_resolves(finished_campaign, tmp_path):
    """A copy of a campaign folder (its SQLite database inside) resolves every path against itself."""
    moved = tmp_path / "moved"
    shutil.copytree(finished_campaign["ctx"].folder, moved)
    info = json.loads(ionflow("lineage", moved, "--model", "v1", "--json"))
    assert info["checkpoint_check"] == "verified" and info["checkpoint_file"].startswith(str(moved))
    (moved / info["checkpoint_path"]).write_bytes(b"not a model")
    assert "MISMATCH" in ionflow("lineage", moved, "--model", "v1", code=4)
    ionflow("export", "dataset", moved, "--model", "v1", "-o", tmp_path / "v1.extxyz")
    assert read_structures(tmp_path / "v1.extxyz")


def test_bad_targets_are_refused_by_name(campaign, tmp_path):
    assert "no such campaign file" in ionflow("lineage", tmp_path / "nowhere", code=2)
    assert "holds no ionflow.db" in ionflow("status", tmp_path, code=2)
    assert "--model 'three'" in ionflow("lineage", campaign["path"], "--model", "three", code=2)
    assert "no campaign 'other'" in ionflow("status", campaign["path"], "--campaign", "other", code=2)
