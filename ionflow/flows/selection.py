"""The select step: for every explored frame, whether it is worth a reference calculation, and why.

(Not ``select.py``: Prefect puts this folder on ``sys.path`` when it loads a deployment's
entrypoint, where a module of that name would shadow the standard library's ``select``.)
"""

from __future__ import annotations

from ase import Atoms
from prefect import get_run_logger, task
from sqlalchemy.orm import Session

from ionflow.db import session_scope
from ionflow.db.queries import (
    chosen_count,
    decisions_of_iteration,
    md_candidates,
    md_runs_of_iteration,
    newest_model,
)
from ionflow.db.records import iteration_row, labelled_set, move_to_test_set, record_decision
from ionflow.flows.context import Context, context, held_out_seed, reached, selection_seed
from ionflow.flows.history import run_name, tracked
from ionflow.platform.device import pick_device
from ionflow.platform.selection import (
    HELD_OUT,
    Decision,
    hold_out,
    nothing_chosen,
    select_diverse,
    select_random,
)
from ionflow.platform.selection import select as select_frames
from ionflow.platform.structures import read_structures, structure_hash


@task(name="select", task_run_name=run_name("select"))
@tracked
def select_task(config_path: str, campaign_id: int, index: int) -> int:
    """Record a decision (score, threshold, chosen or not and why) for every frame the
    iteration's MD sampled; return how many were chosen."""
    ctx = context(config_path)
    cfg = ctx.config.selection
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        if reached(it.status, "selected"):
            return chosen_count(session, it.id)
        rows = md_candidates(session, campaign_id, it.id)
        md_run_of = {row.id: md_run_id for row, md_run_id in rows}
        frames = []
        for run in md_runs_of_iteration(session, campaign_id, index):
            if run.trajectory_path:
                frames.extend(read_structures(ctx.store.path(run.trajectory_path)))
        frame_of = {structure_hash(f): f for f in frames}
        candidates = [row for row, _ in rows if row.hash in frame_of]
        cand_frames = [frame_of[row.hash] for row in candidates]
        settings_hash = ctx.adapter.settings_hash
        training = [a for _, a in labelled_set(session, ctx.store, campaign_id, settings_hash, test=False)]
        known = training + [a for _, a in labelled_set(session, ctx.store, campaign_id, settings_hash, test=True)]
        held = hold_out_for_test(ctx, session, campaign_id, it.id, index, candidates, cand_frames, known)
        rest = sorted(set(range(len(candidates))) - set(held))
        decisions = [Decision(i, cand_frames[i].info["force_std_max"], False, HELD_OUT, "held_out") for i in held]
        decisions += [
            Decision(rest[d.index], d.score, d.chosen, d.reason, d.code, d.rank)
            for d in decide(ctx, session, campaign_id, index, [cand_frames[i] for i in rest], training, known)
        ]
        for d in sorted(decisions, key=lambda d: d.index):
            row, frame = candidates[d.index], cand_frames[d.index]
            record_decision(
                session,
                iteration_id=it.id,
                structure_id=row.id,
                md_run_id=md_run_of[row.id],
                score=d.score,
                energy_uncertainty=float(frame.info.get("energy_std", 0.0)),
                threshold=cfg.threshold,
                chosen=d.chosen,
                reason_code=d.code,
                reason=d.reason,
                rank=d.rank,
            )
        chosen = sum(d.chosen for d in decisions)
        it.metrics = dict(it.metrics or {}, candidates=len(decisions), selected=chosen, held_out=len(held))
        it.selection_strategy = cfg.strategy
        it.selection_threshold = cfg.threshold
        it.selection_ceiling = cfg.ceiling
        it.selection_budget = cfg.per_iteration
        it.selection_min_distance = cfg.min_distance
        it.selection_min_novelty = cfg.min_novelty
        it.selection_seed = selection_seed(ctx.config.seed, index)
        it.selection_held_out = ctx.config.test.held_out_per_iteration
        it.status = "selected"
        get_run_logger().info(
            "iteration %d: %d of %d candidate frames selected for labelling (%s)",
            index,
            chosen,
            len(decisions),
            cfg.strategy,
        )
        return chosen


def hold_out_for_test(
    ctx: Context,
    session: Session,
    campaign_id: int,
    iteration_id: int,
    index: int,
    candidates: list,
    frames: list[Atoms],
    known: list[Atoms],
) -> list[int]:
    """Move ``test.held_out_per_iteration`` of the iteration's candidate frames not yet labelled
    (``known``: the labelled structures), drawn uniformly, into the test set (membership origin
    ``md`` -> ``test-md``, MD run kept); return their indices."""
    n = ctx.config.test.held_out_per_iteration
    if n == 0 or not frames:
        return []
    held = hold_out(frames, n, held_out_seed(ctx.config.seed, index), labelled=known)
    move_to_test_set(session, campaign_id, iteration_id, [candidates[i].id for i in held])
    return held


def decide(
    ctx: Context,
    session: Session,
    campaign_id: int,
    index: int,
    frames: list[Atoms],
    training: list[Atoms],
    known: list[Atoms],
) -> list[Decision]:
    """The decision on each of ``frames`` by the campaign's ``selection.strategy``; frames already
    labelled (``known``: training and test set) are never chosen again; ``diverse`` measures
    novelty against ``training``."""
    cfg = ctx.config.selection
    scores = [f.info["force_std_max"] for f in frames]
    if cfg.strategy == "random":
        seed = selection_seed(ctx.config.seed, index)
        return select_random(frames, scores, cfg.per_iteration, seed=seed, labelled=known)
    if cfg.strategy == "diverse":
        model = newest_model(session, campaign_id, before_index=index)
        if model is None:
            raise RuntimeError(f"iteration {index} has no model to compare atomic environments with")
        # novelty against what the model was trained on; the test set is skipped, not a reference
        return select_diverse(
            frames,
            scores,
            ctx.load(model).to(pick_device()),
            threshold=cfg.threshold,
            ceiling=cfg.ceiling,
            per_iteration=cfg.per_iteration,
            min_novelty=cfg.min_novelty,
            labelled=known,
            reference=training,
        )
    return select_frames(
        frames,
        scores,
        threshold=cfg.threshold,
        ceiling=cfg.ceiling,
        per_iteration=cfg.per_iteration,
        min_distance=cfg.min_distance,
        labelled=known,
    )


def why_nothing_chosen(config_path: str, campaign_id: int, index: int) -> str:
    """The stop reason of an iteration that chose no frame (all trusted, all beyond the ceiling, ...)."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        rows = decisions_of_iteration(session, it.id)
        return nothing_chosen([Decision(r.id, r.score, r.chosen, r.reason, r.reason_code) for r in rows])
