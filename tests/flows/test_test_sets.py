"""Test sets that represent the MD the model meets, through real (tiny) tblite campaigns: explored
frames held out before selection, a test file labelled by the campaign or used with its own labels,
never an overlap with training; exploration that grows into more temperatures and charge states;
models retrained from scratch (``training.from_scratch``)."""

from __future__ import annotations

import numpy as np
from ase.io import write
from sqlalchemy import select

from ionflow.config import SystemConfig
from ionflow.db import (
    Calculation,
    CampaignStructure,
    Iteration,
    MDRun,
    Model,
    SelectionDecision,
    Structure,
    TrainingMember,
    session_scope,
)
from ionflow.dft_adapters.tblite_adapter import TBLiteAdapter
from ionflow.platform.evaluation import evaluate
from ionflow.platform.model import load_model
from ionflow.platform.selection import HELD_OUT
from ionflow.platform.structures import labelled_copy, rattled, structure_hash
from tests.structures import ZUNDEL

from .conftest import tiny_campaign, write_campaign

FAST = {"epochs": 8, "finetune_epochs": 4}


def zundel_rattles(n: int, seed: int):
    return rattled(SystemConfig(charge=1, multiplicity=1, structure=ZUNDEL).atoms(), n, 0.05, seed=seed)


def open_db(path):
    from ionflow.flows.context import context

    return session_scope(context(str(path.resolve())).sessions)


def test_held_out_frames_and_file_form_a_test_set_that_never_trains(tmp_path, prefect_server):
    from ionflow.flows.campaign import campaign_flow

    write(tmp_path / "given.extxyz", zundel_rattles(2, seed=99))  # unlabelled: the campaign labels them
    config = tiny_campaign(
        tmp_path,
        iterations=2,
        training=dict(FAST, from_scratch=True),
        bootstrap={"n_test": 0},
        test={"held_out_per_iteration": 2, "file": "given.extxyz"},
        explore={"walkers": 4, "add_temperatures_K": [500.0], "add_charge_states": [{"charge": 0, "multiplicity": 2}]},
    )
    path = write_campaign(tmp_path, config)
    summary = campaign_flow(str(path))
    assert summary["stop_reason"] == "finished 2 iterations"
    metrics = [row["metrics"] for row in summary["iterations"]]
    errors = [row["model_metrics"] for row in summary["iterations"]]
    # the test set grows: the file's 2 frames, then 2 held-out explored frames per iteration
    assert [m["test_set_n_structures"] for m in metrics] == [2, 4, 6]
    assert [m["test_n_structures"] for m in errors] == [2, 4, 6]
    assert metrics[2]["test_set_n_test-md"] == 4 and metrics[2]["test_set_n_test-file"] == 2
    # every model is evaluated again on the final test set; iteration 2's own errors are those
    assert all(m["current_test_n_structures"] == 6 for m in errors)
    assert errors[2]["current_test_forces_rmse_eV_per_A"] == errors[2]["test_forces_rmse_eV_per_A"]
    assert errors[0]["current_test_forces_rmse_eV_per_A"] != errors[0]["test_forces_rmse_eV_per_A"]

    with open_db(path) as session:
        test_members = session.execute(
            select(CampaignStructure.origin, CampaignStructure.md_run_id, Structure.id, Iteration.index)
            .join(Structure, CampaignStructure.structure_id == Structure.id)
            .join(Iteration, CampaignStructure.iteration_id == Iteration.id)
            .where(CampaignStructure.origin.in_(("test-md", "test-file")))
        ).all()
        held = [m for m in test_members if m.origin == "test-md"]
        assert sorted(m.index for m in held) == [1, 1, 2, 2]
        assert all(m.md_run_id is not None for m in held)  # a held-out frame keeps its MD run
        test_ids = {m.id for m in test_members}
        # each test structure was labelled, none of them is in any model's training or validation set
        labelled = set(session.scalars(select(Calculation.structure_id).where(Calculation.status == "ok")).all())
        assert test_ids <= labelled
        trained = set(
            session.scalars(
                select(Calculation.structure_id).join(TrainingMember, TrainingMember.calculation_id == Calculation.id)
            ).all()
        )
        assert trained and not (trained & test_ids)
        # held-out frames carry a decision that says so, and are never chosen
        decisions = session.scalars(select(SelectionDecision)).all()
        held_decisions = [d for d in decisions if d.reason == HELD_OUT]
        assert {d.structure_id for d in held_decisions} == {m.id for m in held}
        assert not any(d.chosen for d in held_decisions)

        # growth: iteration 1 explores the first condition only; its walkers all ran to the end, so
        # iteration 2 also explores 500 K and the neutral doublet
        runs = session.execute(
            select(Iteration.index, MDRun.temperature_K, MDRun.stop_reason, Structure.charge, Structure.multiplicity)
            .join(Iteration, MDRun.iteration_id == Iteration.id)
            .join(Structure, MDRun.start_structure_id == Structure.id)
        ).all()
        first = {(r.temperature_K, r.charge, r.multiplicity) for r in runs if r.index == 1}
        second = {(r.temperature_K, r.charge, r.multiplicity) for r in runs if r.index == 2}
        assert first == {(350.0, 1, 1)}
        assert all(r.stop_reason == "completed" for r in runs if r.index == 1)
        assert second == {(350.0, 1, 1), (500.0, 1, 1), (350.0, 0, 2)}
        # frames of the new charge state were labelled in that charge state
        neutral = session.scalars(
            select(Calculation).join(Structure).where(Structure.charge == 0, Calculation.status == "ok")
        ).all()
        assert neutral
    assert [m["explore_level"] for m in metrics[1:]] == [0, 1]
    # training.from_scratch: every version trained afresh (epochs, not finetune_epochs); lineage kept
    with open_db(path) as session:
        models = session.scalars(select(Model).order_by(Model.version)).all()
        assert [m.metrics["train_from_parent"] for m in models] == [False] * 3
        assert [m.metrics["train_n_epochs"] for m in models] == [FAST["epochs"]] * 3
        assert [m.parent_id for m in models[1:]] == [m.id for m in models[:-1]]


def test_a_labelled_test_file_is_used_as_given(tmp_path, prefect_server):
    """Labels in the file are the test labels (shifted here by 1 eV so that they cannot be tblite's
    own): the campaign computes nothing for those structures, and its test errors are the hand
    evaluation of its model against the file."""
    from ionflow.flows.campaign import campaign_flow

    frames = zundel_rattles(3, seed=7)
    results = TBLiteAdapter().label(frames)
    given = [labelled_copy(a, r.energy + 1.0, r.forces, dipole=r.dipole) for a, r in zip(frames, results, strict=True)]
    write(tmp_path / "given.extxyz", given)
    config = tiny_campaign(
        tmp_path, iterations=1, training=FAST, bootstrap={"n_test": 0}, test={"file": "given.extxyz"}
    )
    path = write_campaign(tmp_path, config)
    summary = campaign_flow(str(path))
    composition = summary["iterations"][-1]["metrics"]
    assert composition["test_set_n_structures"] == 3 and composition["test_set_n_test-file"] == 3
    final = summary["iterations"][-1]["model_metrics"]
    with open_db(path) as session:
        hashes = set(session.scalars(select(Structure.hash).join(Calculation)).all())
        assert not hashes & {structure_hash(a) for a in given}
        model = session.scalars(select(Model).order_by(Model.version.desc())).first()
        checkpoint = model.checkpoint_path
    from ionflow.flows.context import context

    ensemble = load_model(context(str(path.resolve())).store.path(checkpoint))
    by_hand = evaluate(ensemble, given)  # unrounded positions: the file keeps 8 significant digits
    assert np.isclose(final["test_energy_rmse_eV_per_atom"], by_hand["energy_rmse"], rtol=1e-5)
    assert np.isclose(final["test_forces_rmse_eV_per_A"], by_hand["forces_rmse"], rtol=1e-5)
    assert final["test_energy_rmse_eV_per_atom"] > 1.0 / 7 * 0.5  # the 1 eV shift (1/7 eV per atom) shows
