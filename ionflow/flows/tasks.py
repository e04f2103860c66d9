"""The steps of a campaign as Prefect tasks.

Every task takes references (the campaign file's path, the campaign id, the
iteration index) and returns small summaries; structures, trajectories, labels
and models travel through the database and the object store. Every task is
idempotent: it reads the iteration's status from the database, does only what
is missing, and commits its writes in one transaction (labels: one per
calculation), so a campaign killed at any point resumes where it stopped.

Campaigns may share one database (config ``database_url``): a structure that
several meet is one row with a membership per campaign, and its calculation is
made once, by whichever campaign asks first; the others reuse it, with its
results copied into their own folders.

Iteration statuses: started -> explored -> selected -> labelled -> trained -> done.
Iteration 0 (bootstrap) labels rattled copies of the starting structure instead
of exploring.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ase import Atoms
from prefect import get_run_logger, task
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ionflow.config import CampaignConfig, load_config
from ionflow.db import (
    CampaignStructure,
    Iteration,
    MDRun,
    Model,
    ObjectStore,
    SelectionDecision,
    Structure,
    TrainingMember,
    make_engine,
    session_factory,
    session_scope,
    sha256_file,
    upgrade,
    utcnow,
)
from ionflow.db.records import (
    add_structure,
    adopt_calculation,
    calculation_for,
    is_validation,
    iteration_row,
    labelled_set,
    open_campaign,
    record_or_adopt,
)
from ionflow.dft_adapters import get_adapter
from ionflow.dft_adapters.pool import label_stream
from ionflow.flows.report import stage
from ionflow.platform.md import run_walkers
from ionflow.platform.model import Ensemble, load_model, save_model
from ionflow.platform.model.committee import pick_device
from ionflow.platform.selection import select as select_frames
from ionflow.platform.structures import (
    rattled,
    read_structures,
    structure_hash,
    write_extxyz,
)
from ionflow.platform.training import evaluate as evaluate_committee
from ionflow.platform.training import train_committee

ORDER = ("started", "explored", "selected", "labelled", "trained", "done")


def reached(status: str, step: str) -> bool:
    """Whether an iteration in ``status`` has already finished ``step``."""
    return ORDER.index(status) >= ORDER.index(step)


@dataclass(frozen=True)
class Context:
    """What every task needs, built once per process from the campaign file."""

    config: CampaignConfig
    sessions: sessionmaker[Session]
    store: ObjectStore

    @property
    def folder(self) -> Path:
        return self.config.campaign_dir

    @functools.cached_property
    def adapter(self):
        return get_adapter(self.config.reference.adapter, self.config.reference.settings)


@functools.cache
def context(config_path: str) -> Context:
    config = load_config(config_path)
    config.campaign_dir.mkdir(parents=True, exist_ok=True)
    upgrade(config.db_url)
    return Context(
        config=config, sessions=session_factory(make_engine(config.db_url)), store=ObjectStore(config.campaign_dir)
    )


def _model_of(session: Session, campaign_id: int, before_index: int | None = None) -> Model | None:
    """The newest model of the campaign (made in an iteration before ``before_index``, if given)."""
    query = select(Model).join(Iteration, Model.iteration_id == Iteration.id).where(Model.campaign_id == campaign_id)
    if before_index is not None:
        query = query.where(Iteration.index < before_index)
    return session.scalar(query.order_by(Model.version.desc()).limit(1))


def _load(ctx: Context, model: Model) -> Ensemble:
    path = ctx.store.path(model.checkpoint_path)
    if sha256_file(path) != model.checkpoint_sha256:
        raise RuntimeError(f"model file {path} does not match its recorded sha256; it was changed or damaged")
    return load_model(path)


@task(name="open-campaign")
def open_campaign_task(config_path: str, flow_run_id: str | None = None) -> int:
    """Create (or reopen for resuming) the campaign folder, database and row; return its id."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        campaign = open_campaign(
            session,
            ctx.config.name,
            ctx.config.model_dump(mode="json"),
            ctx.config.science_hash(),
            str(ctx.folder),
        )
        campaign.prefect_flow_run_id = flow_run_id
        session.flush()
        return campaign.id


@task(name="bootstrap")
def bootstrap_task(config_path: str, campaign_id: int) -> int:
    """Iteration 0: rattled copies of the starting structure, to train on and to test on."""
    ctx = context(config_path)
    cfg = ctx.config
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, 0)
        if reached(it.status, "selected"):
            return 0
        start = cfg.system.atoms()
        train = rattled(start, cfg.bootstrap.n_train, cfg.bootstrap.rattle_stdev, seed=cfg.seed)
        test = rattled(start, cfg.bootstrap.n_test, cfg.bootstrap.rattle_stdev, seed=cfg.seed + 10_000)
        for atoms, origin in [(a, "initial") for a in train] + [(a, "test") for a in test]:
            add_structure(session, ctx.store, atoms, origin, campaign_id=campaign_id, iteration_id=it.id)
        it.status = "selected"
        return len(train) + len(test)


def _walker_starts(ctx: Context, session: Session, campaign_id: int, index: int) -> list[Atoms]:
    """Each walker continues from its last trusted frame of the previous iteration when it
    ran to completion; otherwise (first iteration, or it was stopped) from a fresh rattle."""
    cfg = ctx.config
    fresh = rattled(cfg.system.atoms(), cfg.explore.walkers, 0.03, seed=cfg.seed * 7919 + index)
    previous = session.scalars(
        select(MDRun)
        .join(Iteration, MDRun.iteration_id == Iteration.id)
        .where(MDRun.campaign_id == campaign_id, Iteration.index == index - 1)
    ).all()
    by_walker = {run.walker: run for run in previous}
    starts = []
    for w in range(cfg.explore.walkers):
        run = by_walker.get(w)
        if run is not None and run.stop_reason == "completed" and run.trajectory_path:
            frames = read_structures(ctx.store.path(run.trajectory_path))
            starts.append(frames[-1])
        else:
            starts.append(fresh[w])
    for atoms in starts:
        atoms.info = {"charge": cfg.system.charge, "multiplicity": cfg.system.multiplicity}
    return starts


@task(name="explore")
def explore_task(config_path: str, campaign_id: int, index: int) -> dict[str, Any]:
    """MD walkers with the current model; every sampled frame becomes a candidate structure."""
    ctx = context(config_path)
    cfg = ctx.config.explore
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        if reached(it.status, "explored"):
            return dict(it.metrics or {})
        model = _model_of(session, campaign_id, before_index=index)
        if model is None:
            raise RuntimeError(f"iteration {index} has no model to explore with")
        committee = _load(ctx, model).to(pick_device())  # a GPU worker's GPU, if it has one
        starts = _walker_starts(ctx, session, campaign_id, index)
        temperature = cfg.temperature_K * cfg.temperature_ramp ** (index - 1)
        with stage(f"explore: {cfg.walkers} walkers, {temperature:.0f} K", cfg.steps) as update:
            walkers = run_walkers(
                committee,
                starts,
                steps=cfg.steps,
                timestep_fs=cfg.timestep_fs,
                temperature_K=temperature,
                friction_per_fs=cfg.friction_per_fs,
                sample_every=cfg.sample_every,
                stop_uncertainty=cfg.stop_uncertainty,
                seed=ctx.config.seed * 104729 + index,
                progress=update,
            )
        scores = []
        for w in walkers:
            start_row = add_structure(
                session, ctx.store, w.start, "md-start", campaign_id=campaign_id, iteration_id=it.id
            )
            trajectory = None
            if w.frames:
                with tempfile.TemporaryDirectory() as tmp:
                    trajectory, _ = ctx.store.put_file(
                        write_extxyz(Path(tmp) / "trajectory.extxyz", w.frames), "trajectories"
                    )
            run = MDRun(
                campaign_id=campaign_id,
                iteration_id=it.id,
                model_id=model.id,
                start_structure_id=start_row.id,
                walker=w.walker,
                temperature_K=temperature,
                timestep_fs=cfg.timestep_fs,
                n_steps_requested=cfg.steps,
                n_steps_done=w.n_steps_done,
                stop_reason=w.stop_reason,
                trajectory_path=trajectory,
                wall_time_s=w.wall_time_s,
            )
            session.add(run)
            session.flush()
            for frame in w.frames:
                add_structure(
                    session, ctx.store, frame, "md", campaign_id=campaign_id, iteration_id=it.id, md_run_id=run.id
                )
                scores.append(frame.info["force_std_max"])
        it.metrics = {
            "explored_frames": len(scores),
            "explored_force_std_mean": float(sum(scores) / len(scores)) if scores else None,
            "explored_force_std_max": float(max(scores)) if scores else None,
            "walkers_stopped": sum(w.stop_reason != "completed" for w in walkers),
            "temperature_K": temperature,
        }
        it.status = "explored"
        get_run_logger().info(
            "iteration %d explored: %d walkers (%d stopped early), %d candidate frames, force spread mean %.3f max %.3f eV/Å",
            index,
            len(walkers),
            it.metrics["walkers_stopped"],
            len(scores),
            it.metrics["explored_force_std_mean"] or 0.0,
            it.metrics["explored_force_std_max"] or 0.0,
        )
        return dict(it.metrics)


@task(name="select")
def select_task(config_path: str, campaign_id: int, index: int) -> int:
    """Decide, for every explored frame, whether it is labelled; return how many were chosen."""
    ctx = context(config_path)
    cfg = ctx.config.selection
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        if reached(it.status, "selected"):
            return session.scalar(
                select(func.count()).where(SelectionDecision.iteration_id == it.id, SelectionDecision.chosen.is_(True))
            )
        # this iteration's MD frames: the structures that entered the campaign here as "md"
        rows = session.execute(
            select(Structure, CampaignStructure.md_run_id)
            .join(CampaignStructure, CampaignStructure.structure_id == Structure.id)
            .where(
                CampaignStructure.campaign_id == campaign_id,
                CampaignStructure.iteration_id == it.id,
                CampaignStructure.origin == "md",
            )
        ).all()
        md_run_of = {row.id: md_run_id for row, md_run_id in rows}
        runs = session.scalars(select(MDRun).where(MDRun.iteration_id == it.id)).all()
        frames = []
        for run in runs:
            if run.trajectory_path:
                frames.extend(read_structures(ctx.store.path(run.trajectory_path)))
        frame_of = {structure_hash(f): f for f in frames}
        candidates = [row for row, _ in sorted(rows, key=lambda r: r[0].id) if row.hash in frame_of]
        cand_frames = [frame_of[row.hash] for row in candidates]
        settings_hash = ctx.adapter.settings_hash
        known = [a for _, a in labelled_set(session, ctx.store, campaign_id, settings_hash, test=False)]
        known += [a for _, a in labelled_set(session, ctx.store, campaign_id, settings_hash, test=True)]
        decisions = select_frames(
            cand_frames,
            [f.info["force_std_max"] for f in cand_frames],
            threshold=cfg.threshold,
            ceiling=cfg.ceiling,
            per_iteration=cfg.per_iteration,
            min_distance=cfg.min_distance,
            labelled=known,
        )
        for d in decisions:
            row, frame = candidates[d.index], cand_frames[d.index]
            session.add(
                SelectionDecision(
                    iteration_id=it.id,
                    structure_id=row.id,
                    md_run_id=md_run_of[row.id],
                    score=d.score,
                    energy_uncertainty=float(frame.info.get("energy_std", 0.0)),
                    threshold=cfg.threshold,
                    chosen=d.chosen,
                    reason=d.reason,
                )
            )
        chosen = sum(d.chosen for d in decisions)
        it.metrics = dict(it.metrics or {}, candidates=len(decisions), selected=chosen)
        it.status = "selected"
        get_run_logger().info(
            "iteration %d: %d of %d candidate frames selected for labelling", index, chosen, len(decisions)
        )
        return chosen


def _to_label(session: Session, it: Iteration) -> list[Structure]:
    """Structures this iteration must have labels for (computed now or already), by id."""
    if it.index == 0:
        query = (
            select(Structure)
            .join(CampaignStructure, CampaignStructure.structure_id == Structure.id)
            .where(
                CampaignStructure.campaign_id == it.campaign_id,
                CampaignStructure.iteration_id == it.id,
                CampaignStructure.origin.in_(("initial", "test")),
            )
        )
    else:
        query = (
            select(Structure)
            .join(SelectionDecision, SelectionDecision.structure_id == Structure.id)
            .where(SelectionDecision.iteration_id == it.id, SelectionDecision.chosen.is_(True))
        )
    return list(session.scalars(query.order_by(Structure.id)).all())


#: Tag of the label step: a Prefect task concurrency limit on it bounds labelling server-wide.
LABEL_TAG = "ionflow-label"


def _pending(ctx: Context, campaign_id: int, index: int) -> tuple[int | None, list[int], int]:
    """(iteration id, structure ids still to compute, labels adopted) of iteration ``index``;
    iteration id None when it is labelled already.

    A structure that already has a calculation at this level of theory (same settings hash)
    is never computed again, whatever its status, even when another campaign sharing the
    database computed it: that calculation is adopted (its results copied into this
    campaign's object store).
    """
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        if reached(it.status, "labelled"):
            return None, [], 0
        pending, reused = [], 0
        for row in _to_label(session, it):
            calculation = calculation_for(session, row.id, ctx.adapter.settings_hash)
            if calculation is None:
                pending.append(row.id)
            else:  # computed before a restart, or by another campaign sharing the database
                adopt_calculation(session, ctx.store, calculation)
                reused += 1
        return it.id, pending, reused


def _compute(
    ctx: Context, structure_ids: list[int], index: int, iteration_id: int, workers: int
) -> tuple[dict[str, int], int]:
    """Label ``structure_ids`` on ``workers`` local workers, committing each result as it ends;
    return (counts per status, results another writer recorded first)."""
    ref = ctx.config.reference
    with session_scope(ctx.sessions) as session:
        rows = [session.get(Structure, i) for i in structure_ids]
        structures = [ctx.store.get_structure(row.path) for row in rows]
        run_dirs = [ctx.folder / "dft" / f"{index:03d}-{row.hash[:16]}" for row in rows]
    counts: dict[str, int] = {}
    reused = 0
    workers = min(workers, max(1, len(structure_ids)))
    name = ctx.adapter.name
    with stage(f"label: {len(rows)} × {name} on {workers} worker{'s' * (workers > 1)}", len(rows)) as update:
        stream = label_stream(
            ref.adapter,
            ref.settings,
            structures,
            run_dirs,
            workers=workers,
            threads=ref.threads_per_worker,
            timeout_s=ref.timeout_s,
        )
        for done, (i, result) in enumerate(stream, 1):
            recorded = record_or_adopt(
                ctx.sessions, ctx.store, structure_ids[i], result, name, ref.settings, iteration_id
            )
            if not recorded:  # another campaign sharing the database recorded it while this one computed
                reused += 1
            else:
                counts[result.status] = counts.get(result.status, 0) + 1
                if not result.ok:
                    get_run_logger().warning(
                        "calculation of structure %s: %s (%s)", structure_ids[i], result.status, result.error
                    )
            update(done, len(rows))
    return counts, reused


def _close_labelling(ctx: Context, campaign_id: int, index: int, counts: dict[str, int], reused: int) -> None:
    with session_scope(ctx.sessions) as session:
        iteration_row(session, campaign_id, index).status = "labelled"
    get_run_logger().info(
        "iteration %d labelled with %s: %s%s",
        index,
        ctx.adapter.name,
        counts or "nothing new",
        f" ({reused} labels already in the database)" if reused else "",
    )


@task(name="label", tags=[LABEL_TAG])
def label_task(config_path: str, campaign_id: int, index: int) -> dict[str, int]:
    """Reference calculations of the iteration's chosen structures on ``reference.workers``
    local workers, each committed as it ends (see :func:`_pending` for what is reused)."""
    ctx = context(config_path)
    iteration_id, pending, reused = _pending(ctx, campaign_id, index)
    if iteration_id is None:
        return {}
    counts, raced = _compute(ctx, pending, index, iteration_id, ctx.config.reference.workers)
    _close_labelling(ctx, campaign_id, index, counts, reused + raced)
    return counts


@task(name="label-plan")
def label_plan_task(config_path: str, campaign_id: int, index: int) -> tuple[int | None, list[int], int]:
    """The distributed label step's first part: what is still to compute (ids only)."""
    return _pending(context(config_path), campaign_id, index)


@task(name="label-chunk")
def label_chunk_task(
    config_path: str, index: int, iteration_id: int, structure_ids: list[int]
) -> tuple[dict[str, int], int]:
    """Label a chunk of structures where the task runs (a Dask worker), one calculation at a
    time, each committed to the database as it ends; return (counts, raced)."""
    ctx = context(config_path)
    return _compute(ctx, structure_ids, index, iteration_id, workers=1)


@task(name="label-close")
def label_close_task(config_path: str, campaign_id: int, index: int, counts: dict[str, int], reused: int) -> None:
    _close_labelling(context(config_path), campaign_id, index, counts, reused)


@task(name="train")
def train_task(config_path: str, campaign_id: int, index: int) -> int:
    """Fit a new committee version on every label so far (refined from the previous version)."""
    ctx = context(config_path)
    cfg = ctx.config
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        existing = session.scalar(select(Model).where(Model.iteration_id == it.id))
        if existing is not None:
            it.status = "trained" if not reached(it.status, "trained") else it.status
            return existing.id
        pool = labelled_set(session, ctx.store, campaign_id, ctx.adapter.settings_hash, test=False)
        if not pool:
            raise RuntimeError("no usable labels to train on: every reference calculation failed")
        split = {
            calc.id: is_validation(atoms.info["structure_hash"], cfg.training.valid_fraction) for calc, atoms in pool
        }
        if all(split.values()) or (len(pool) >= 4 and not any(split.values()) and cfg.training.valid_fraction > 0):
            # keep both sets non-empty: move the first label across
            split[pool[0][0].id] = not split[pool[0][0].id]
        train = [a for c, a in pool if not split[c.id]]
        valid = [a for c, a in pool if split[c.id]]
        parent = _model_of(session, campaign_id, before_index=index)
        parent_committee = _load(ctx, parent) if parent is not None else None
        epochs = cfg.training.finetune_epochs if parent is not None else cfg.training.epochs
        label = f"train: {cfg.model.ensemble_size} {'heads' if cfg.model.uncertainty == 'shallow' else 'members'}, {len(train)}+{len(valid)} labels"
        with stage(label, epochs) as update:
            committee, report = train_committee(
                train,
                valid,
                cfg.model.model_dump(),
                epochs=epochs,
                learning_rate=cfg.training.learning_rate * (0.5 if parent is not None else 1.0),
                batch_size=cfg.training.batch_size,
                energy_weight=cfg.training.energy_weight,
                forces_weight=cfg.training.forces_weight,
                charges_weight=cfg.training.charges_weight,
                dipole_weight=cfg.training.dipole_weight,
                seed=cfg.seed + index,
                parent=parent_committee,
                progress=update,
            )
        models_dir = ctx.folder / "models"
        path = save_model(committee, models_dir / f"model-v{index}.pt")
        model = Model(
            campaign_id=campaign_id,
            iteration_id=it.id,
            version=index,
            parent_id=parent.id if parent is not None else None,
            kind=f"mace-{cfg.model.uncertainty}",
            hyperparameters={
                "model": cfg.model.model_dump(),
                "training": cfg.training.model_dump(),
                "spec": committee.spec.to_dict(),
            },
            metrics={"train": report.__dict__, "valid": evaluate_committee(committee, valid)},
            checkpoint_path=str(path.relative_to(ctx.folder)),
            checkpoint_sha256=sha256_file(path),
        )
        session.add(model)
        session.flush()
        for calc, _ in pool:
            session.add(
                TrainingMember(model_id=model.id, calculation_id=calc.id, split="valid" if split[calc.id] else "train")
            )
        write_extxyz(ctx.folder / "dataset.extxyz", [a for _, a in pool])
        it.status = "trained"
        get_run_logger().info(
            "model v%d trained on %d+%d labels in %.0f s (%d epochs%s)",
            index,
            len(train),
            len(valid),
            report.wall_time_s,
            epochs,
            f", from v{parent.version}" if parent else "",
        )
        return model.id


@task(name="evaluate")
def evaluate_task(config_path: str, campaign_id: int, index: int) -> dict[str, Any]:
    """Errors of the iteration's model on the fixed test set; closes the iteration."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        if reached(it.status, "done"):
            return dict(it.metrics or {})
        model = session.scalar(select(Model).where(Model.iteration_id == it.id))
        test = [a for _, a in labelled_set(session, ctx.store, campaign_id, ctx.adapter.settings_hash, test=True)]
        write_extxyz(ctx.folder / "test.extxyz", test)
        metrics = dict(it.metrics or {})
        if model is not None and test:
            m = evaluate_committee(_load(ctx, model), test)
            model.metrics = dict(model.metrics or {}, test=m)
            metrics.update({f"test_{k}": v for k, v in m.items() if k != "n"}, test_n=m["n"])
        it.metrics = metrics
        it.status = "done"
        it.finished_at = utcnow()
        if "test_forces_rmse" in metrics:
            get_run_logger().info(
                "iteration %d: test energy RMSE %.1f meV/atom, force RMSE %.3f eV/Å on %d structures",
                index,
                1000 * metrics["test_energy_rmse"],
                metrics["test_forces_rmse"],
                metrics["test_n"],
            )
        return metrics


@task(name="close-iteration")
def close_iteration_task(config_path: str, campaign_id: int, index: int, reason: str) -> None:
    """Mark an iteration done without a new model (nothing was worth labelling)."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        it.metrics = dict(it.metrics or {}, stop_reason=reason)
        it.status = "done"
        it.finished_at = utcnow()
