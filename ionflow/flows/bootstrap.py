"""Iteration 0's first step: rattled copies of the starting structure, to train on and to test on,
and the structures of an unlabelled test file. With ``bootstrap.source: foundation_md`` the
training structures come from MD with the foundation model instead (a zero-shot start)."""

from __future__ import annotations

import math

from ase import Atoms
from prefect import get_run_logger, task

from ionflow.db import session_scope
from ionflow.db.records import add_structure, iteration_row
from ionflow.flows.context import Context, bootstrap_seeds, context, md_seed, reached, walker_start_seed
from ionflow.flows.history import run_name, tracked
from ionflow.flows.report import stage
from ionflow.platform.device import pick_device
from ionflow.platform.finetune import zero_shot
from ionflow.platform.md import run_walkers
from ionflow.platform.model.kernels import accelerate
from ionflow.platform.structures import rattled, with_charge_state


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
        if cfg.bootstrap.source == "foundation_md":
            train = zero_shot_frames(ctx)
        else:
            train = rattled(start, cfg.bootstrap.n_train, cfg.bootstrap.rattle_stdev, seed=train_seed)
        test = rattled(start, cfg.bootstrap.n_test, cfg.bootstrap.rattle_stdev, seed=test_seed)
        # a test file without labels is labelled here, with the bootstrap; one with labels is read as it is
        given, labelled = cfg.test_structures()
        given = [] if labelled else given
        members = [(a, "initial") for a in train] + [(a, "test") for a in test] + [(a, "test-file") for a in given]
        for atoms, origin in members:
            step = atoms.info.get("md_step")
            add_structure(
                session,
                ctx.store,
                atoms,
                origin,
                campaign_id=campaign_id,
                iteration_id=it.id,
                md_step=None if step is None else int(step),
            )
        it.status = "selected"
        return len(members)


def zero_shot_frames(ctx: Context) -> list[Atoms]:
    """``bootstrap.n_train`` frames of Langevin MD with the foundation model alone (its spreads are
    zero: only a contact below :data:`~ionflow.platform.md.MIN_CONTACT` stops a walker), from
    ``explore.walkers`` rattled starts at ``explore.temperature_K``, each walker's frames spread
    evenly over ``bootstrap.md_steps``, taken round-robin over the walkers. Rattles make up the
    count when walkers stopped too early to give enough."""
    cfg = ctx.config
    n_train, walkers = cfg.bootstrap.n_train, cfg.explore.walkers
    per_walker = math.ceil(n_train / walkers)
    steps = cfg.bootstrap.md_steps
    every = max(1, steps // per_walker)
    system = cfg.system.atoms()
    starts = [
        with_charge_state(a, cfg.system.charge, cfg.system.multiplicity)
        for a in rattled(system, walkers, cfg.explore.start_rattle_stdev, seed=walker_start_seed(cfg.seed, 0))
    ]
    device = pick_device()
    ensemble = accelerate(
        zero_shot(ctx.foundation, cfg.model.settings()).to(device), device, cfg.training.mixed_precision
    )
    with stage(f"bootstrap: zero-shot MD with the foundation, {walkers} walkers", steps) as update:
        runs = run_walkers(
            ensemble,
            starts,
            steps=steps,
            timestep_fs=cfg.explore.timestep_fs,
            temperature_K=cfg.explore.temperature_K,
            friction_per_fs=cfg.explore.friction_per_fs,
            sample_every=every,
            stop_uncertainty=math.inf,
            seed=md_seed(cfg.seed, 0),
            progress=update,
        )
    columns = [run.frames[-per_walker:] for run in runs]  # the last: furthest from the rattled start
    # round-robin over the walkers from their last frames back, so that a count that is not a multiple
    # of the walkers takes the extra frames from late in the runs
    frames = [column[-k] for k in range(1, per_walker + 1) for column in columns if k <= len(column)][:n_train]
    stopped = sum(run.stop_reason != "completed" for run in runs)
    get_run_logger().info(
        "zero-shot bootstrap: %d of %d frames from %d walkers x %d steps of foundation MD (%d stopped by a close "
        "contact); rattles make up the rest",
        len(frames),
        n_train,
        walkers,
        steps,
        stopped,
    )
    if len(frames) < n_train:
        train_seed, _ = bootstrap_seeds(cfg.seed)
        frames += rattled(system, n_train - len(frames), cfg.bootstrap.rattle_stdev, seed=train_seed)
    for atoms in frames:
        atoms.calc = None
        atoms.info = {k: atoms.info[k] for k in ("charge", "multiplicity", "md_step") if k in atoms.info}
    return frames
