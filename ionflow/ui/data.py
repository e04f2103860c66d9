"""What each dashboard page shows, read from the provenance database.

One function per page; each asks a fixed number of queries whatever the campaign's size (the
views of :mod:`ionflow.db.views` and a few grouped selects), so pages stay fast on campaigns with
100k structures (``benchmarks/ui_pages.py``). Values are plain dicts and lists, ready for the
templates and for JSON.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, aliased

from ionflow.db.metrics import test_errors
from ionflow.db.models import (
    Calculation,
    Campaign,
    CampaignStructure,
    Iteration,
    MDRun,
    Model,
    PrefectRun,
    SelectionDecision,
    Structure,
)
from ionflow.db.provenance import decisions, lineage
from ionflow.db.queries import follow_indexes
from ionflow.db.views import cased

#: Failed calculations listed on a campaign page (the count of all is shown).
FAILURES_SHOWN = 50
#: Score histogram bins on the selection panel.
SCORE_BINS = 30


def _curve(session: Session, campaign_id: int | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM ionflow_learning_curve"
    params: dict[str, Any] = {}
    if campaign_id is not None:
        sql += " WHERE campaign_id = :c"
        params["c"] = campaign_id
    result = session.execute(text(sql + " ORDER BY campaign_id, iteration_index"), params)
    return [cased(dict(r._mapping)) for r in result]


def campaigns(session: Session) -> list[dict[str, Any]]:
    """Every campaign: status, iterations, labels (ok reference calculations it ran), reference CPU
    hours, its newest model's test errors, and why it stopped. Three queries."""
    rows = session.execute(
        select(Campaign.id, Campaign.name, Campaign.status, Campaign.workdir, Campaign.updated_at).order_by(Campaign.id)
    ).all()
    curve = _curve(session)
    stops = dict(
        session.execute(
            select(Iteration.campaign_id, Iteration.stop_reason)
            .where(Iteration.stop_reason.is_not(None))
            .order_by(Iteration.index)
        ).all()
    )
    out = []
    for row in rows:
        mine = [r for r in curve if r["campaign_id"] == row.id]
        tested = [r for r in mine if r["test_forces_rmse_eV_per_A"] is not None]
        out.append(
            {
                "id": row.id,
                "name": row.name,
                "status": row.status,
                "folder": row.workdir,
                "updated_at": row.updated_at,
                "iterations": len(mine),
                "labels": mine[-1]["reference_ok"] if mine else 0,
                "reference_cpu_h": (mine[-1]["reference_cpu_s"] or 0.0) / 3600 if mine else 0.0,
                "test_energy_rmse_meV_per_atom": _milli(tested[-1]["test_energy_rmse_eV_per_atom"]) if tested else None,
                "test_forces_rmse_eV_per_A": tested[-1]["test_forces_rmse_eV_per_A"] if tested else None,
                "latest_model": next(
                    (r["model_version"] for r in reversed(mine) if r["model_version"] is not None), None
                ),
                "stop_reason": stops.get(row.id),
            }
        )
    return out


def _rows(session: Session, statement: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in session.execute(statement)]


def _milli(value: float | None) -> float | None:
    return None if value is None else 1000 * value


def campaign(session: Session, campaign_id: int, iteration: int | None = None) -> dict[str, Any] | None:
    """The campaign page: learning curve, calibration per iteration, the selection of one iteration
    (``iteration``, default the newest that selected), failures, Prefect runs. Eight queries."""
    row = session.get(Campaign, campaign_id)
    if row is None:
        return None
    curve = _curve(session, campaign_id)
    iterations = session.execute(
        select(Iteration.index, Iteration.status, Iteration.stop_reason, Iteration.started_at, Iteration.finished_at)
        .where(Iteration.campaign_id == campaign_id)
        .order_by(Iteration.index)
    ).all()
    models = session.execute(
        select(Model.id, Model.version, Model.metrics, Iteration.index)
        .join(Iteration, Iteration.id == Model.iteration_id)
        .where(Model.campaign_id == campaign_id)
        .order_by(Model.version)
    ).all()
    calibration = []
    for model_id, version, metrics, index in models:
        m = metrics or {}
        prefix = "current_test" if m.get("current_test_force_std_mean_eV_per_A") is not None else "test"
        calibration.append(
            {
                "iteration": index,
                "model_id": model_id,
                "version": version,
                "predicted_eV_per_A": m.get(f"{prefix}_force_std_mean_eV_per_A"),
                "real_eV_per_A": m.get(f"{prefix}_forces_rmse_eV_per_A"),
                "z_rms": m.get(f"{prefix}_force_z_rms"),
                "spearman": m.get(f"{prefix}_forces_spearman"),
            }
        )
    selected = [r.index for r in iterations if r.index > 0]
    shown = iteration if iteration is not None else (selected[-1] if selected else None)
    selection = _selection(session, campaign_id, shown) if shown is not None else None
    n_failed = session.scalar(
        select(func.count(Calculation.id))
        .join(Iteration, Iteration.id == Calculation.iteration_id)
        .where(Iteration.campaign_id == campaign_id, Calculation.status != "ok")
    )
    failed_it = aliased(Iteration)
    failures = _rows(
        session,
        select(
            Calculation.id.label("calculation_id"),
            failed_it.index.label("iteration"),
            Calculation.structure_id,
            Calculation.status,
            Calculation.error,
            Calculation.run_dir,
            Calculation.wall_time_s,
        )
        .join(failed_it, failed_it.id == Calculation.iteration_id)
        .where(failed_it.campaign_id == campaign_id, Calculation.status != "ok")
        .order_by(Calculation.id)
        .limit(FAILURES_SHOWN),
    )
    run_it = aliased(Iteration)
    runs = [
        {**dict(r._mapping), "ui_url": prefect_ui_url(r.api_url, r.kind, r.run_id, r.temporary_server)}
        for r in session.execute(
            select(
                PrefectRun.run_id,
                PrefectRun.kind,
                PrefectRun.name,
                PrefectRun.state,
                PrefectRun.api_url,
                PrefectRun.temporary_server,
                PrefectRun.started_at,
                PrefectRun.ended_at,
                run_it.index.label("iteration"),
            )
            .outerjoin(run_it, run_it.id == PrefectRun.iteration_id)
            .where(PrefectRun.campaign_id == campaign_id)
            .order_by(PrefectRun.started_at, PrefectRun.id)
        )
    ]
    return {
        "id": row.id,
        "name": row.name,
        "status": row.status,
        "folder": row.workdir,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "reference": (row.config or {}).get("reference", {}).get("adapter"),
        "iterations": [dict(r._mapping) for r in iterations],
        "curve": curve,
        "calibration": calibration,
        "selection": selection,
        "selectable": selected,
        "failures": failures,
        "n_failed": n_failed,
        "prefect_runs": runs,
        "state": state_key(row.status, row.updated_at, [(r.index, r.status) for r in iterations]),
    }


def state_key(status: str, updated_at: Any, iterations: list[tuple[int, str]]) -> str:
    """A short string that changes whenever the campaign page would (the live page polls it)."""
    return f"{status}|{updated_at}|" + ",".join(f"{i}:{s}" for i, s in iterations)


def campaign_state(session: Session, campaign_id: int) -> dict[str, Any] | None:
    """What the live campaign page polls: status and the state key. Two queries."""
    row = session.execute(select(Campaign.status, Campaign.updated_at).where(Campaign.id == campaign_id)).first()
    if row is None:
        return None
    iterations = session.execute(
        select(Iteration.index, Iteration.status).where(Iteration.campaign_id == campaign_id).order_by(Iteration.index)
    ).all()
    return {"status": row.status, "state": state_key(row.status, row.updated_at, [tuple(r) for r in iterations])}


def _selection(session: Session, campaign_id: int, index: int) -> dict[str, Any]:
    rows = decisions(session, campaign_id, index)
    scores = [r["score_eV_per_A"] for r in rows]
    top = max(scores, default=1.0)
    width = top / SCORE_BINS if top > 0 else 1.0
    edges = [k * width for k in range(SCORE_BINS + 1)]
    chosen = [0] * SCORE_BINS
    rejected = [0] * SCORE_BINS
    for r in rows:
        k = min(int(r["score_eV_per_A"] / width), SCORE_BINS - 1) if width > 0 else 0
        (chosen if r["chosen"] else rejected)[k] += 1
    first = rows[0] if rows else {}
    return {
        "iteration": index,
        "strategy": first.get("strategy"),
        "threshold_eV_per_A": first.get("threshold_eV_per_A"),
        "ceiling_eV_per_A": first.get("ceiling_eV_per_A"),
        "n": len(rows),
        "n_chosen": sum(bool(r["chosen"]) for r in rows),
        "reasons": sorted(Counter((bool(r["chosen"]), r["reason_code"]) for r in rows).items(), key=lambda kv: -kv[1]),
        "histogram": {"edges": edges, "chosen": chosen, "rejected": rejected},
        "rows": rows,
    }


def prefect_ui_url(api_url: str | None, kind: str, run_id: str, temporary: bool) -> str | None:
    """The Prefect UI page of a run (None when its server was temporary: it is gone)."""
    if not api_url or temporary:
        return None
    base = api_url.rstrip("/")
    base = base[: -len("/api")] if base.endswith("/api") else base
    return f"{base}/runs/{'flow-run' if kind == 'flow' else 'task-run'}/{run_id}"


def model(session: Session, model_id: int) -> dict[str, Any] | None:
    """The model page: lineage (parents and children), hyper-parameters, metrics, training set counts."""
    row = session.get(Model, model_id)
    if row is None:
        return None
    follow_indexes(session)
    info = lineage(session, row)
    children = session.execute(select(Model.id, Model.version).where(Model.parent_id == model_id)).all()
    info["children"] = [{"model_id": c.id, "version": c.version} for c in children]
    info["test_errors"] = test_errors(info["metrics"])
    return info


def structure(session: Session, structure_id: int, campaign_id: int | None = None) -> dict[str, Any] | None:
    """The structure page: the structure, its calculations, how it entered each campaign (MD run and
    step), the decisions about it. Five queries."""
    row = session.get(Structure, structure_id)
    if row is None:
        return None
    it = aliased(Iteration)
    memberships = _rows(
        session,
        select(
            CampaignStructure.campaign_id,
            Campaign.name.label("campaign"),
            CampaignStructure.origin,
            it.index.label("iteration"),
            CampaignStructure.md_run_id,
            CampaignStructure.md_step,
        )
        .join(Campaign, Campaign.id == CampaignStructure.campaign_id)
        .outerjoin(it, it.id == CampaignStructure.iteration_id)
        .where(CampaignStructure.structure_id == structure_id)
        .order_by(CampaignStructure.campaign_id),
    )
    calculations = _rows(
        session,
        select(
            Calculation.id,
            Calculation.adapter,
            Calculation.code_version,
            Calculation.status,
            Calculation.energy.label("energy_eV"),
            Calculation.wall_time_s,
            Calculation.cpu_time_s,
            Calculation.run_dir,
            Calculation.error,
        )
        .where(Calculation.structure_id == structure_id)
        .order_by(Calculation.id),
    )
    run_ids = [m["md_run_id"] for m in memberships if m["md_run_id"] is not None]
    runs = {
        r.id: dict(r._mapping)
        for r in session.execute(
            select(
                MDRun.id,
                MDRun.walker,
                MDRun.temperature_K,
                MDRun.n_steps_done,
                MDRun.stop_reason,
                MDRun.start_origin,
                MDRun.model_id,
            ).where(MDRun.id.in_(run_ids))
        )
    }
    for m in memberships:
        m["md_run"] = runs.get(m["md_run_id"])
    dec_it = aliased(Iteration)
    decided = _rows(
        session,
        select(
            dec_it.campaign_id,
            dec_it.index.label("iteration"),
            SelectionDecision.score.label("score_eV_per_A"),
            SelectionDecision.threshold.label("threshold_eV_per_A"),
            SelectionDecision.chosen,
            SelectionDecision.reason_code,
            SelectionDecision.rank,
            SelectionDecision.reason,
        )
        .join(dec_it, dec_it.id == SelectionDecision.iteration_id)
        .where(SelectionDecision.structure_id == structure_id)
        .order_by(dec_it.campaign_id, dec_it.index),
    )
    return {
        "id": row.id,
        "hash": row.hash,
        "formula": row.formula,
        "n_atoms": row.n_atoms,
        "charge": row.charge,
        "multiplicity": row.multiplicity,
        "path": row.path,
        "memberships": memberships,
        "calculations": calculations,
        "decisions": decided,
        "campaign_id": campaign_id
        if campaign_id is not None
        else (memberships[0]["campaign_id"] if memberships else None),
    }
