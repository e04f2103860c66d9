"""One provenance writer for the concurrency test: ``python writer.py URL STORE K``.

Writes what a campaign's tasks write, through ionflow's own functions, each step in its own
transaction: its campaign, an iteration, 50 structures (25 shared by every writer, 25 its
own), one calculation per structure (the shared ones race with the other writers), an MD run,
a selection decision per structure and a model trained on all 50 labels. It waits for "go"
on stdin so that all writers start at once.
"""

from __future__ import annotations

import sys

import numpy as np
from ase import Atoms

from ionflow.db import (
    MDRun,
    Model,
    ObjectStore,
    SelectionDecision,
    TrainingMember,
    make_engine,
    session_factory,
    session_scope,
)
from ionflow.db.records import add_structure, iteration_row, labelled_set, open_campaign, record_or_adopt
from ionflow.dft_adapters.base import LabelResult

SHARED, OWN = 25, 25
SETTINGS_HASH = "f" * 64


def structure(seed: int) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]] + rng.normal(0, 0.05, (3, 3)))
    atoms.info.update(charge=0, multiplicity=1)
    return atoms


def result(atoms: Atoms, writer: int) -> LabelResult:
    return LabelResult(
        status="ok",
        code="test",
        code_version="1",
        settings_hash=SETTINGS_HASH,
        wall_time_s=0.01,
        energy=-100.0 - atoms.positions.sum(),
        forces=np.zeros((len(atoms), 3)),
        host=f"writer-{writer}",
    )


def main(url: str, store_root: str, k: int) -> None:
    sessions = session_factory(make_engine(url))
    store = ObjectStore(f"{store_root}/{k}")
    print("ready", flush=True)
    sys.stdin.readline()
    with session_scope(sessions) as session:
        campaign_id = open_campaign(session, f"writer-{k}", {"k": k}, "c" * 64, f"{store_root}/{k}").id
        iteration_id = iteration_row(session, campaign_id, 0).id
    seeds = list(range(SHARED)) + [1000 * (k + 1) + i for i in range(OWN)]
    ids = []
    for seed in seeds:
        with session_scope(sessions) as session:
            ids.append(add_structure(session, store, structure(seed), "initial", campaign_id, iteration_id).id)
    for seed, structure_id in zip(seeds, ids):
        record_or_adopt(sessions, store, structure_id, result(structure(seed), k), "test", {"k": 0}, iteration_id)
    with session_scope(sessions) as session:
        run = MDRun(
            campaign_id=campaign_id,
            iteration_id=iteration_id,
            start_structure_id=ids[0],
            walker=0,
            temperature_K=300.0,
            timestep_fs=0.5,
            n_steps_requested=10,
            n_steps_done=10,
            stop_reason="completed",
            wall_time_s=0.1,
        )
        session.add(run)
        session.flush()
        for structure_id in ids:
            session.add(
                SelectionDecision(
                    iteration_id=iteration_id,
                    structure_id=structure_id,
                    md_run_id=run.id,
                    score=0.5,
                    energy_uncertainty=0.0,
                    threshold=0.1,
                    chosen=True,
                    reason_code="uncertain",
                    reason="above threshold",
                )
            )
    with session_scope(sessions) as session:
        labels = labelled_set(session, store, campaign_id, SETTINGS_HASH, test=False)
        model = Model(
            campaign_id=campaign_id,
            iteration_id=iteration_id,
            version=0,
            kind="test",
            hyperparameters={},
            metrics={},
            checkpoint_path="none",
            checkpoint_sha256="0" * 64,
        )
        session.add(model)
        session.flush()
        for calc, _ in labels:
            session.add(TrainingMember(model_id=model.id, calculation_id=calc.id, split="train"))
    print(f"done {len(labels)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
