"""The explore step: MD walkers driven by the current model; every sampled frame becomes a candidate."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ase import Atoms
from prefect import get_run_logger, task
from sqlalchemy.orm import Session

from ionflow.db import session_scope
from ionflow.db.queries import md_runs_of_iteration, newest_model
from ionflow.db.records import add_structure, iteration_row, record_md_run
from ionflow.flows.context import Context, context, md_seed, reached, walker_start_seed
from ionflow.flows.report import stage
from ionflow.platform.device import pick_device
from ionflow.platform.md import run_walkers
from ionflow.platform.structures import rattled, read_structures, write_extxyz


def walker_steps(ctx: Context, session: Session, campaign_id: int, index: int) -> int:
    """MD steps per walker in iteration ``index``: ``explore.steps`` at first; after an iteration
    whose walkers all ran to the end (none stopped by uncertainty), ``explore.growth`` times
    longer (at most ``explore.max_steps``); otherwise as long as before. Read from the database,
    so a resumed campaign explores as far as it would have."""
    cfg = ctx.config.explore
    previous = md_runs_of_iteration(session, campaign_id, index - 1)
    if not previous:
        return cfg.steps
    steps = max(run.n_steps_requested for run in previous)
    if all(run.stop_reason == "completed" for run in previous):
        steps = int(round(steps * cfg.growth))
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


def walker_starts(ctx: Context, session: Session, campaign_id: int, index: int) -> list[Atoms]:
    """Each walker continues from its last trusted frame of the previous iteration when it
    ran to completion; otherwise (first iteration, or it was stopped) from a fresh rattle."""
    cfg = ctx.config
    fresh = rattled(
        cfg.system.atoms(), cfg.explore.walkers, cfg.explore.start_rattle_stdev, seed=walker_start_seed(cfg.seed, index)
    )
    by_walker = {run.walker: run for run in md_runs_of_iteration(session, campaign_id, index - 1)}
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
    """Run ``explore.walkers`` Langevin walkers with the newest model; record each run, its
    trajectory and its sampled frames (as candidate structures); return the iteration's metrics."""
    ctx = context(config_path)
    cfg = ctx.config.explore
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        if reached(it.status, "explored"):
            return dict(it.metrics or {})
        model = newest_model(session, campaign_id, before_index=index)
        if model is None:
            raise RuntimeError(f"iteration {index} has no model to explore with")
        ensemble = ctx.load(model).to(pick_device())  # a GPU worker's GPU, if it has one
        starts = walker_starts(ctx, session, campaign_id, index)
        steps = walker_steps(ctx, session, campaign_id, index)
        temperature = cfg.temperature_K * cfg.temperature_ramp ** (index - 1)
        with stage(f"explore: {cfg.walkers} walkers, {temperature:.0f} K", steps) as update:
            walkers = run_walkers(
                ensemble,
                starts,
                steps=steps,
                timestep_fs=cfg.timestep_fs,
                temperature_K=temperature,
                friction_per_fs=cfg.friction_per_fs,
                sample_every=cfg.sample_every,
                stop_uncertainty=cfg.stop_uncertainty,
                seed=md_seed(ctx.config.seed, index),
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
            run = record_md_run(
                session,
                campaign_id=campaign_id,
                iteration_id=it.id,
                model_id=model.id,
                start_structure_id=start_row.id,
                walker=w.walker,
                temperature_K=temperature,
                timestep_fs=cfg.timestep_fs,
                n_steps_requested=steps,
                n_steps_done=w.n_steps_done,
                stop_reason=w.stop_reason,
                trajectory_path=trajectory,
                wall_time_s=w.wall_time_s,
            )
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
            "walker_steps": steps,
            "walker_time_fs": steps * cfg.timestep_fs,
        }
        it.status = "explored"
        get_run_logger().info(
            "iteration %d explored: %d walkers (%d stopped early), %d candidate frames, "
            "force spread mean %.3f max %.3f eV/Å",
            index,
            len(walkers),
            it.metrics["walkers_stopped"],
            len(scores),
            it.metrics["explored_force_std_mean"] or 0.0,
            it.metrics["explored_force_std_max"] or 0.0,
        )
        return dict(it.metrics)


def fit_for_md(config_path: str, campaign_id: int, index: int) -> str | None:
    """The stop reason when the model is fit for MD (``fit_for_md_steps``): every walker of
    iteration ``index`` ran at least that many steps without an uncertainty stop; else None."""
    ctx = context(config_path)
    target = ctx.config.fit_for_md_steps
    if target is None:
        return None
    with session_scope(ctx.sessions) as session:
        runs = md_runs_of_iteration(session, campaign_id, index)
        if not runs or not all(r.stop_reason == "completed" and r.n_steps_done >= target for r in runs):
            return None
        shortest = min(r.n_steps_done for r in runs)
        temperatures = sorted({round(r.temperature_K) for r in runs})
        fs = shortest * runs[0].timestep_fs
    kelvin = "/".join(str(t) for t in temperatures)
    return (
        f"fit for MD: all {len(runs)} walkers ran {shortest} steps ({fs / 1000:g} ps) at {kelvin} K "
        f"without an uncertainty stop (fit_for_md_steps {target})"
    )
