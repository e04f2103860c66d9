"""The explore step: MD walkers driven by the current model; every sampled frame becomes a candidate."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ase import Atoms
from prefect import get_run_logger, task
from sqlalchemy.orm import Session

from ionflow.config import CampaignConfig
from ionflow.db import session_scope
from ionflow.db.queries import md_runs_of_iteration, newest_model
from ionflow.db.records import add_structure, iteration_row, record_md_run
from ionflow.flows.context import Context, context, md_seed, reached, walker_start_seed
from ionflow.flows.history import run_name, tracked, walkers
from ionflow.flows.report import stage
from ionflow.platform.device import pick_device
from ionflow.platform.md import run_walkers
from ionflow.platform.model.kernels import accelerate
from ionflow.platform.structures import charge_of, multiplicity_of, rattled, read_structures, write_extxyz


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


@dataclass(frozen=True)
class Condition:
    """What one walker explores: a thermostat temperature (K, before ``temperature_ramp``) and a
    charge state of the system's atoms."""

    temperature_K: float
    charge: int
    multiplicity: int

    def __str__(self) -> str:
        return f"{self.temperature_K:g} K, charge {self.charge:+d}, multiplicity {self.multiplicity}"


def conditions(cfg: CampaignConfig, level: int) -> list[Condition]:
    """The conditions unlocked at growth ``level``: (i-th temperature, j-th charge state) with
    i + j <= level, the 0th being ``explore.temperature_K`` and the system's charge state."""
    temperatures = [cfg.explore.temperature_K, *cfg.explore.add_temperatures_K]
    states = [(cfg.system.charge, cfg.system.multiplicity)]
    states += [(s.charge, s.multiplicity) for s in cfg.explore.add_charge_states]
    return [Condition(t, q, m) for i, t in enumerate(temperatures) for j, (q, m) in enumerate(states) if i + j <= level]


def max_level(cfg: CampaignConfig) -> int:
    """The growth level at which every condition is unlocked."""
    return len(cfg.explore.add_temperatures_K) + len(cfg.explore.add_charge_states)


def growth_level(ctx: Context, session: Session, campaign_id: int, index: int) -> int:
    """The growth level of iteration ``index``: 0 at first; one more after an iteration whose
    walkers all ran to the end (no uncertainty stop), up to :func:`max_level`. Read from the
    database (the previous iteration's level and MD runs), so a resumed campaign agrees."""
    previous = md_runs_of_iteration(session, campaign_id, index - 1)
    if not previous:
        return 0
    level = int((iteration_row(session, campaign_id, index - 1).metrics or {}).get("explore_level", 0))
    if all(run.stop_reason == "completed" for run in previous):
        level += 1
    return min(level, max_level(ctx.config))


def walker_conditions(cfg: CampaignConfig, level: int) -> list[Condition]:
    """One condition per walker: the unlocked ones, round-robin (every one has a walker, since the
    configuration has at least as many walkers as conditions)."""
    unlocked = conditions(cfg, level)
    return [unlocked[w % len(unlocked)] for w in range(cfg.explore.walkers)]


def walker_starts(
    ctx: Context, session: Session, campaign_id: int, index: int, assigned: list[Condition]
) -> list[tuple[Atoms, int | None]]:
    """Each walker's start and the MD run it continues (None: a fresh start). A walker continues
    from its last trusted frame of the previous iteration when it ran to completion in the same
    charge state; otherwise (first iteration, it was stopped, or its charge state changed) from a
    fresh rattle of the starting structure."""
    cfg = ctx.config
    fresh = rattled(
        cfg.system.atoms(), cfg.explore.walkers, cfg.explore.start_rattle_stdev, seed=walker_start_seed(cfg.seed, index)
    )
    by_walker = {run.walker: run for run in md_runs_of_iteration(session, campaign_id, index - 1)}
    starts = []
    for w, condition in enumerate(assigned):
        run = by_walker.get(w)
        start, continues = fresh[w], None
        if run is not None and run.stop_reason == "completed" and run.trajectory_path:
            last = read_structures(ctx.store.path(run.trajectory_path))[-1]
            if (charge_of(last), multiplicity_of(last)) == (condition.charge, condition.multiplicity):
                start, continues = last, run.id
        start.info = {"charge": condition.charge, "multiplicity": condition.multiplicity}
        starts.append((start, continues))
    return starts


@task(name="explore", task_run_name=run_name("explore", walkers))
@tracked
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
        device = pick_device()  # a GPU worker's GPU, if it has one (with cuEquivariance kernels where installed)
        ensemble = accelerate(ctx.load(model).to(device), device, ctx.config.training.mixed_precision)
        level = growth_level(ctx, session, campaign_id, index)
        assigned = walker_conditions(ctx.config, level)
        starts = walker_starts(ctx, session, campaign_id, index, assigned)
        continues = [run_id for _, run_id in starts]
        steps = walker_steps(ctx, session, campaign_id, index)
        ramp = cfg.temperature_ramp ** (index - 1)
        temperatures = [c.temperature_K * ramp for c in assigned]
        kelvin = "/".join(f"{t:.0f}" for t in sorted(set(temperatures)))
        with stage(f"explore: {cfg.walkers} walkers, {kelvin} K", steps) as update:
            walkers = run_walkers(
                ensemble,
                [atoms for atoms, _ in starts],
                steps=steps,
                timestep_fs=cfg.timestep_fs,
                temperature_K=temperatures,
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
                start_origin="rattle" if continues[w.walker] is None else "previous_run",
                start_md_run_id=continues[w.walker],
                walker=w.walker,
                temperature_K=temperatures[w.walker],
                timestep_fs=cfg.timestep_fs,
                n_steps_requested=steps,
                n_steps_done=w.n_steps_done,
                stop_reason=w.stop_reason,
                trajectory_path=trajectory,
                wall_time_s=w.wall_time_s,
            )
            for frame in w.frames:
                add_structure(
                    session,
                    ctx.store,
                    frame,
                    "md",
                    campaign_id=campaign_id,
                    iteration_id=it.id,
                    md_run_id=run.id,
                    md_step=int(frame.info["md_step"]),
                )
                scores.append(frame.info["force_std_max"])
        it.metrics = {
            "explored_frames": len(scores),
            "explored_force_std_mean_eV_per_A": float(sum(scores) / len(scores)) if scores else None,
            "explored_force_std_max_eV_per_A": float(max(scores)) if scores else None,
            "walkers_stopped": sum(w.stop_reason != "completed" for w in walkers),
            "temperature_max_K": max(temperatures),
            "explore_level": level,
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
            it.metrics["explored_force_std_mean_eV_per_A"] or 0.0,
            it.metrics["explored_force_std_max_eV_per_A"] or 0.0,
        )
        return dict(it.metrics)


def fit_for_md(config_path: str, campaign_id: int, index: int) -> str | None:
    """The stop reason when the model is fit for MD (``fit_for_md_steps``): every condition
    (temperature, charge state) is unlocked and every walker of iteration ``index`` ran at least
    that many steps without an uncertainty stop; else None."""
    ctx = context(config_path)
    target = ctx.config.fit_for_md_steps
    if target is None:
        return None
    with session_scope(ctx.sessions) as session:
        runs = md_runs_of_iteration(session, campaign_id, index)
        metrics = iteration_row(session, campaign_id, index).metrics or {}
        if metrics.get("explore_level", 0) < max_level(ctx.config):
            return None
        if not runs or not all(r.stop_reason == "completed" and r.n_steps_done >= target for r in runs):
            return None
        shortest = min(r.n_steps_done for r in runs)
        temperatures = sorted({round(r.temperature_K) for r in runs})
        fs = shortest * runs[0].timestep_fs
    kelvin = "/".join(str(t) for t in temperatures)
    states = len(ctx.config.explore.add_charge_states) + 1
    where = f"at {kelvin} K" + (f" in {states} charge states" if states > 1 else "")
    return (
        f"fit for MD: all {len(runs)} walkers ran {shortest} steps ({fs / 1000:g} ps) {where} "
        f"without an uncertainty stop (fit_for_md_steps {target})"
    )
