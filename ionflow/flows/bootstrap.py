"""Iteration 0's first step: rattled copies of the starting structure, to train on and to test on,
and the structures of an unlabelled test file."""

from __future__ import annotations

from prefect import task

from ionflow.db import session_scope
from ionflow.db.records import add_structure, iteration_row
from ionflow.flows.context import bootstrap_seeds, context, reached
from ionflow.flows.history import run_name, tracked
from ionflow.platform.structures import rattled


@task(name="bootstrap", task_run_name=run_name("bootstrap"))
@tracked(index=0)
def bootstrap_task(config_path: str, campaign_id: int) -> int:
    """Add ``bootstrap.n_train`` training and ``bootstrap.n_test`` test structures to iteration 0
    (in place of explore and select), and the structures of an unlabelled ``test.file``; return
    how many structures it holds."""
    ctx = context(config_path)
    cfg = ctx.config
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, 0)
        if reached(it.status, "selected"):
            return 0
        start = cfg.system.atoms()
        train_seed, test_seed = bootstrap_seeds(cfg.seed)
        train = rattled(start, cfg.bootstrap.n_train, cfg.bootstrap.rattle_stdev, seed=train_seed)
        test = rattled(start, cfg.bootstrap.n_test, cfg.bootstrap.rattle_stdev, seed=test_seed)
        # a test file without labels is labelled here, with the bootstrap; one with labels is read as it is
        given, labelled = cfg.test_structures()
        given = [] if labelled else given
        members = [(a, "initial") for a in train] + [(a, "test") for a in test] + [(a, "test-file") for a in given]
        for atoms, origin in members:
            add_structure(session, ctx.store, atoms, origin, campaign_id=campaign_id, iteration_id=it.id)
        it.status = "selected"
        return len(members)
