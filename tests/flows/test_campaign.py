"""A real campaign through the real Prefect flow, checked in the database it writes."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from ionflow.db import (
    Calculation,
    Campaign,
    CampaignStructure,
    Iteration,
    MDRun,
    Model,
    SelectionDecision,
    TrainingMember,
    session_scope,
    sha256_file,
)
from ionflow.platform.model import load_calculator
from ionflow.platform.structures import read_structures
from tests.structures import hydronium

from .conftest import tiny_campaign, write_campaign


@pytest.fixture(scope="module")
def finished(tmp_path_factory, prefect_server):
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context

    tmp = tmp_path_factory.mktemp("e2e")
    path = write_campaign(tmp, tiny_campaign(tmp))
    summary = campaign_flow(str(path))
    ctx = context(str(path.resolve()))
    return summary, ctx, path


def count(session, model, *where):
    return session.scalar(select(func.count()).select_from(model).where(*where))


def test_campaign_runs_every_iteration(finished):
    summary, ctx, _ = finished
    assert summary["stop_reason"] == "finished 2 iterations"
    with session_scope(ctx.sessions) as s:
        campaign = s.scalar(select(Campaign))
        assert campaign.status == "finished"
        assert campaign.prefect_flow_run_id  # a reference to the Prefect run
        iterations = s.scalars(select(Iteration).order_by(Iteration.index)).all()
        assert [it.index for it in iterations] == [0, 1, 2]
        assert all(it.status == "done" and it.finished_at is not None for it in iterations)
        for it in iterations:
            assert it.metrics["test_set_n_structures"] == 3
            (model,) = it.models
            assert model.metrics["test_forces_rmse_eV_per_A"] > 0
            assert model.metrics["test_n_structures"] == 3


def test_every_selected_frame_is_labelled_and_trained_on(finished):
    _, ctx, _ = finished
    with session_scope(ctx.sessions) as s:
        chosen = s.scalars(select(SelectionDecision).where(SelectionDecision.chosen.is_(True))).all()
        assert 1 <= len(chosen) <= 2 * 3
        for d in chosen:
            calc = s.scalar(select(Calculation).where(Calculation.structure_id == d.structure_id))
            assert calc is not None and calc.status == "ok"
            assert d.score >= d.threshold
            assert d.md_run_id is not None
            # the frame entered the campaign in the decision's iteration, sampled by the decision's run
            member = s.scalar(select(CampaignStructure).where(CampaignStructure.structure_id == d.structure_id))
            assert (member.origin, member.iteration_id, member.md_run_id) == ("md", d.iteration_id, d.md_run_id)
        rejected = count(s, SelectionDecision, SelectionDecision.chosen.is_(False))
        assert rejected > 0  # every candidate has a decision, with a reason
        assert all(d.reason for d in s.scalars(select(SelectionDecision)))
        # 6 initial + 3 test + the chosen ones, all computed once
        assert count(s, Calculation) == 9 + len(chosen)
        latest = s.scalar(select(Model).order_by(Model.version.desc()))
        members = s.scalars(select(TrainingMember).where(TrainingMember.model_id == latest.id)).all()
        test_ids = set(
            s.scalars(
                select(Calculation.id)
                .join(CampaignStructure, CampaignStructure.structure_id == Calculation.structure_id)
                .where(CampaignStructure.origin == "test")
            ).all()
        )
        assert len(test_ids) == 3
        assert len(members) == 6 + len(chosen)
        assert not {m.calculation_id for m in members} & test_ids  # never train on the test set
        assert {m.split for m in members} == {"train", "valid"}


def test_models_form_a_lineage_with_verified_files(finished):
    _, ctx, _ = finished
    with session_scope(ctx.sessions) as s:
        models = s.scalars(select(Model).order_by(Model.version)).all()
        assert [m.version for m in models] == [0, 1, 2]
        assert models[0].parent_id is None
        assert [m.parent_id for m in models[1:]] == [models[0].id, models[1].id]
        for m in models:
            path = ctx.store.path(m.checkpoint_path)
            assert sha256_file(path) == m.checkpoint_sha256
            assert m.metrics["test_n_structures"] == 3
        runs = s.scalars(select(MDRun)).all()
        assert len(runs) == 2 * 2
        assert {r.model_id for r in runs} == {models[0].id, models[1].id}
        assert all(r.n_steps_done >= 1 and r.stop_reason for r in runs)


def test_outputs_are_usable(finished):
    summary, ctx, _ = finished
    dataset = read_structures(summary["dataset"])
    assert all("REF_energy" in a.info and "REF_forces" in a.arrays for a in dataset)
    assert all(a.info["charge"] == 1 and a.info["multiplicity"] == 1 for a in dataset)
    test = read_structures(summary["test_set"])
    atoms = test[0]
    atoms.calc = load_calculator(summary["model"])
    energy = atoms.get_potential_energy()
    assert abs(energy - atoms.info["REF_energy"]) < 5.0  # right scale: within a few eV of GFN2-xTB
    assert atoms.calc.results["forces_uncertainty"].shape == (len(atoms),)


def test_rerun_of_a_finished_campaign_computes_nothing(finished):
    from ionflow.flows.campaign import campaign_flow

    summary, ctx, path = finished
    with session_scope(ctx.sessions) as s:
        before = s.execute(select(Calculation.id, Calculation.created_at)).all()
        models_before = count(s, Model)
    again = campaign_flow(str(path))
    with session_scope(ctx.sessions) as s:
        assert s.execute(select(Calculation.id, Calculation.created_at)).all() == before
        assert count(s, Model) == models_before
    assert again["model"] == summary["model"]


def test_status_prints_the_iterations_from_the_database(finished):
    from typer.testing import CliRunner

    from ionflow.cli import app

    _, ctx, path = finished
    for target in (str(ctx.folder), str(path)):
        result = CliRunner().invoke(app, ["status", target], env={"COLUMNS": "160"})
        assert result.exit_code == 0, result.output
        assert "tiny (finished)" in result.output
        lines = [line for line in result.output.splitlines() if "done" in line]
        assert len(lines) == 3 and "v2" in lines[-1]


def test_learning_curve_counts_labels_and_reference_cost(finished):
    from typer.testing import CliRunner

    from ionflow.cli import app
    from ionflow.db import iteration_table

    summary, ctx, path = finished
    with session_scope(ctx.sessions) as s:
        campaign_id = s.scalar(select(Campaign.id))
        rows = iteration_table(s, campaign_id)
        calcs = s.execute(select(Calculation.iteration_id, Calculation.cpu_time_s, Calculation.wall_time_s)).all()
        iteration_index = dict(s.execute(select(Iteration.id, Iteration.index)).all())
        for row in rows:
            model = s.scalar(select(Model).join(Iteration).where(Iteration.index == row["index"]))
            # labels used: the members the iteration's model was fitted on
            assert row["n_training_labels"] == count(s, TrainingMember, TrainingMember.model_id == model.id)
    # every tblite calculation knows its CPU time, and the curve's cost is their running sum
    assert all(cpu is not None and cpu > 0 for _, cpu, _ in calcs)
    for row in rows:
        spent = sum(cpu for it, cpu, _ in calcs if iteration_index[it] <= row["index"])
        assert row["reference_cpu_s"] == pytest.approx(spent)
    assert [r["n_training_labels"] for r in rows] == sorted(r["n_training_labels"] for r in rows)
    picture = summary["learning_curve"]
    with open(picture, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(app, ["status", str(path)], env={"COLUMNS": "200"})
    assert "fit" in result.output and "CPU" in result.output


def test_campaign_with_a_shallow_ensemble(tmp_path, prefect_server):
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context
    from ionflow.platform.model import ShallowEnsemble, load_model

    config = tiny_campaign(tmp_path, iterations=1, model={"uncertainty": "shallow", "ensemble_size": 4})
    path = write_campaign(tmp_path, config)
    summary = campaign_flow(str(path))
    assert summary["stop_reason"] == "finished 1 iterations"
    ctx = context(str(path.resolve()))
    with session_scope(ctx.sessions) as session:
        models = session.scalars(select(Model).order_by(Model.version)).all()
        assert [m.kind for m in models] == ["mace-shallow", "mace-shallow"]
        for m in models:
            model = load_model(ctx.folder / m.checkpoint_path)
            assert isinstance(model, ShallowEnsemble) and model.member.heads == 4
            assert model.spec.hyper["electrostatics"] == "equilibrated", "the campaign default is electrostatic"
            # the calibration fitted on the validation labels travels in the file and the database
            assert m.hyperparameters["spec"]["calibration"] == model.spec.calibration
            assert model.spec.calibration != {"energy": 1.0, "forces": 1.0}
            assert m.metrics["valid_force_z_rms"] == pytest.approx(1.0, rel=1e-6)


def test_walkers_grow_with_trust_and_the_campaign_stops_when_fit_for_md(tmp_path, prefect_server):
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context

    config = tiny_campaign(
        tmp_path,
        iterations=5,
        fit_for_md_steps=20,
        # no uncertainty stop can happen (100 eV/Å), so every iteration's walkers complete
        explore={"steps": 10, "sample_every": 5, "growth": 2.0, "max_steps": 20},
    )
    summary = campaign_flow(str(write_campaign(tmp_path, config)))
    assert summary["stop_reason"].startswith("fit for MD: all 2 walkers ran 20 steps")
    ctx = context(str((tmp_path / "campaign.yaml").resolve()))
    with session_scope(ctx.sessions) as s:
        runs = s.execute(
            select(Iteration.index, MDRun.n_steps_requested, MDRun.n_steps_done).join(Iteration).order_by(MDRun.id)
        ).all()
        assert [tuple(r) for r in runs] == [(1, 10, 10), (1, 10, 10), (2, 20, 20), (2, 20, 20)]
        last = s.scalar(select(Iteration).where(Iteration.index == 2))
        assert last.status == "done" and last.stop_reason == summary["stop_reason"]
        assert count(s, SelectionDecision, SelectionDecision.iteration_id == last.id) == 0  # nothing more to label
        assert count(s, Model) == 2  # v0 and v1: the model that passed is v1


def test_campaign_fine_tuned_from_a_foundation_model(tmp_path, prefect_server, foundation_file, foundation_pretraining):
    """model.foundation: the bootstrap's training frames come from MD with the foundation alone
    (zero-shot), every version keeps the foundation's architecture and names its file; the
    campaign's preflight refuses a system with an element the foundation lacks before any work."""
    from typer.testing import CliRunner

    from ionflow.cli import app
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context
    from ionflow.platform.model import load_model
    from ionflow.platform.model.foundation import file_sha256
    from ionflow.platform.structures import write_extxyz

    write_extxyz(tmp_path / "replay.extxyz", foundation_pretraining[::4])
    h3o = hydronium()  # a system the small foundation knows (it collapses the Zundel cation's O-H-O)
    system = {
        "charge": 1,
        "multiplicity": 1,
        "structure": {"symbols": list(h3o.symbols), "positions": h3o.positions.tolist()},
    }
    config = tiny_campaign(
        tmp_path,
        iterations=1,
        system=system,
        model={"foundation": str(foundation_file)},
        training={"frozen_layers": 1, "replay_file": "replay.extxyz", "replay_frames": 8},
        bootstrap={"n_train": 6, "n_test": 3, "source": "foundation_md", "md_steps": 60},
    )
    path = write_campaign(tmp_path, config)
    checked = CliRunner().invoke(app, ["validate", str(path)])
    assert checked.exit_code == 0, checked.output
    summary = campaign_flow(str(path))
    assert summary["stop_reason"] == "finished 1 iterations"
    ctx = context(str(path.resolve()))
    sha = file_sha256(foundation_file)
    with session_scope(ctx.sessions) as session:
        initial = session.scalars(select(CampaignStructure).where(CampaignStructure.origin == "initial")).all()
        # 2 walkers x 3 frames from 60 steps: sampled at steps 20, 40, 60
        assert sorted(m.md_step for m in initial) == [20, 20, 40, 40, 60, 60]
        models = session.scalars(select(Model).order_by(Model.version)).all()
        assert len(models) == 2
        for m in models:
            model = load_model(ctx.folder / m.checkpoint_path)
            assert model.spec.foundation["sha256"] == sha and model.spec.z_table == [1, 6, 8]
            assert m.hyperparameters["spec"]["foundation"]["sha256"] == sha
            assert m.hyperparameters["model"]["foundation"] == str(foundation_file)
    shown = CliRunner().invoke(app, ["lineage", str(path)], env={"COLUMNS": "250"})
    assert f"foundation {foundation_file} (sha256 {sha})" in shown.output, shown.output

    config = tiny_campaign(tmp_path / "n", model={"foundation": str(foundation_file)})
    config["system"]["structure"]["symbols"][0] = "N"  # the Zundel cation with N for an O
    config["system"]["multiplicity"] = 2
    refused = CliRunner().invoke(app, ["run", str(write_campaign(tmp_path, config, "nitrogen.yaml"))])
    assert refused.exit_code == 2 and "hold N, which the foundation model" in " ".join(refused.output.split())
    assert not (tmp_path / "n" / "runs").exists()
