"""Provenance questions answered from the database: a model's lineage, and the tables a user exports.

Each function answers with a fixed number of queries (the training set of a model on 100k
structures in milliseconds; ``benchmarks/lineage_query.py``). Rows are plain dicts whose keys carry
units where a quantity has one (``energy_eV``, ``score_eV_per_A``), ready for JSON, CSV or Parquet.
The SQL views of :mod:`ionflow.db.views` answer the same questions for users of SQL.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import literal, select, text
from sqlalchemy.orm import Session, aliased

from ionflow.db.models import (
    Calculation,
    Campaign,
    CampaignStructure,
    Iteration,
    MDRun,
    Model,
    PrefectRun,
    Structure,
    TrainingMember,
)
from ionflow.db.queries import TEST_ORIGINS, follow_indexes, model_ancestors
from ionflow.db.views import cased


def training_set_hash(members: Iterable[tuple[str, str, str]]) -> str:
    """sha256 of a training set: its (structure hash, settings hash, split) triples, sorted, one
    per line. The same labels give the same hash in the database and in the model file."""
    lines = sorted(f"{s} {h} {split}\n" for s, h, split in members)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def campaign_folder(given: Path | None, recorded: str, only_campaign: bool) -> Path:
    """The folder a campaign's relative paths resolve against: ``given`` (the folder a user named,
    perhaps after moving or copying it) when it is that campaign's (the database holds no other
    campaign, or the folder has the recorded one's name), else the folder the database recorded
    (another campaign sharing the database lives elsewhere)."""
    if given is not None and (only_campaign or given.name == Path(recorded).name):
        return given
    return Path(recorded)


def find_model(session: Session, campaign_id: int, version: int | None = None) -> Model:
    """Model ``version`` of a campaign (None: the newest); LookupError naming the versions there are."""
    query = select(Model).where(Model.campaign_id == campaign_id)
    model = session.scalar(
        query.where(Model.version == version) if version is not None else query.order_by(Model.version.desc()).limit(1)
    )
    if model is None:
        versions = session.scalars(select(Model.version).where(Model.campaign_id == campaign_id)).all()
        have = ", ".join(f"v{v}" for v in sorted(versions)) or "none yet"
        raise LookupError(
            f"no model {'v' + str(version) if version is not None else ''} in this campaign (models: {have})"
        )
    return model


def _members(session: Session, model_id: int) -> list[dict[str, Any]]:
    result = session.execute(
        text("SELECT * FROM ionflow_training_set WHERE model_id = :m ORDER BY calculation_id"), {"m": model_id}
    )
    return _dicts(result)


def _dicts(result: Any) -> list[dict[str, Any]]:
    """The rows of a view's result as dicts keyed by the documented column names (one renaming
    for the result, not one per row: a model's training set has thousands of rows)."""
    keys = list(cased(dict.fromkeys(result.keys())))
    return [dict(zip(keys, row)) for row in result.tuples()]


def lineage(session: Session, model: Model) -> dict[str, Any]:
    """Everything a model came from: its campaign, parents (nearest first), hyper-parameters, metrics
    (units in their keys), checkpoint path and sha256 as recorded, the hash of its training set, and
    its training members (calculation, structure, split, origin, iteration, MD run and step, the
    decision that chose it), with counts by split, origin and reason."""
    campaign = session.get(Campaign, model.campaign_id)
    follow_indexes(session)
    ancestors = model_ancestors(session, model.id, columns=True)
    members = _members(session, model.id)
    remote = dict(  # calculations run through AiiDA: the node that computed each
        session.execute(
            select(Calculation.id, Calculation.aiida_uuid)
            .join(TrainingMember, TrainingMember.calculation_id == Calculation.id)
            .where(TrainingMember.model_id == model.id, Calculation.aiida_uuid.is_not(None))
        ).all()
    )
    for m in members:
        m["aiida_uuid"] = remote.get(m["calculation_id"])
    by = Counter((m["split"], m["origin"] or "-", m["chosen_because"] or "-") for m in members)
    iteration = session.get(Iteration, model.iteration_id) if model.iteration_id is not None else None
    runs = session.execute(
        select(PrefectRun.run_id, PrefectRun.name, PrefectRun.state, PrefectRun.api_url, PrefectRun.temporary_server)
        .where(PrefectRun.iteration_id == model.iteration_id)
        .order_by(PrefectRun.started_at)
    ).all()
    return {
        "campaign": campaign.name,
        "campaign_id": campaign.id,
        "campaign_folder": campaign.workdir,
        "model_id": model.id,
        "version": model.version,
        "kind": model.kind,
        "iteration_index": iteration.index if iteration is not None else None,
        "created_at": model.created_at.isoformat(),
        "parents": [{"version": p.version, "model_id": p.id, "kind": p.kind} for p in ancestors],
        "hyperparameters": model.hyperparameters,
        "metrics": model.metrics or {},
        "checkpoint_path": model.checkpoint_path,
        "checkpoint_sha256": model.checkpoint_sha256,
        "training_set_sha256": training_set_hash(
            (m["structure_hash"], m["settings_hash"], m["split"]) for m in members
        ),
        "counts": [
            {"split": split, "origin": origin, "chosen_because": why, "n": n}
            for (split, origin, why), n in sorted(by.items())
        ],
        "prefect_runs": [dict(r._mapping) for r in runs],
        "members": members,
    }


# --- exports ---------------------------------------------------------------------------------


def decisions(session: Session, campaign_id: int, iteration: int | None = None) -> list[dict[str, Any]]:
    """Every selection decision of the campaign (or of iteration ``iteration``): the view
    ``ionflow_decisions``."""
    sql = "SELECT * FROM ionflow_decisions WHERE campaign_id = :c"
    params: dict[str, Any] = {"c": campaign_id}
    if iteration is not None:
        sql += " AND iteration_index = :i"
        params["i"] = iteration
    return _dicts(session.execute(text(sql + " ORDER BY iteration_index, decision_id"), params))


def calculations(session: Session, campaign_id: int) -> list[dict[str, Any]]:
    """The campaign's reference calculations (those its iterations ran), with their structures."""
    it = aliased(Iteration)
    rows = session.execute(
        select(
            Calculation.id.label("calculation_id"),
            it.index.label("iteration_index"),
            Structure.id.label("structure_id"),
            Structure.hash.label("structure_hash"),
            Structure.formula,
            Structure.n_atoms,
            Structure.charge.label("charge_e"),
            Structure.multiplicity,
            Calculation.adapter,
            Calculation.code_version,
            Calculation.settings_hash,
            Calculation.status,
            Calculation.energy.label("energy_eV"),
            Calculation.wall_time_s,
            Calculation.cpu_time_s,
            Calculation.host,
            Calculation.run_dir,
            Calculation.results_path,
            Calculation.results_sha256,
            Calculation.error,
            Calculation.created_at,
            Calculation.aiida_uuid,
            Calculation.remote_job_id,
        )
        .join(it, it.id == Calculation.iteration_id)
        .join(Structure, Structure.id == Calculation.structure_id)
        .where(it.campaign_id == campaign_id)
        .order_by(Calculation.id)
    )
    return [dict(r._mapping) for r in rows]


def md_runs(session: Session, campaign_id: int) -> list[dict[str, Any]]:
    """The campaign's MD walker runs: model, start, conditions, how far they got and why they stopped."""
    it, start, model = aliased(Iteration), aliased(Structure), aliased(Model)
    rows = session.execute(
        select(
            MDRun.id.label("md_run_id"),
            it.index.label("iteration_index"),
            MDRun.walker,
            model.version.label("model_version"),
            MDRun.start_structure_id,
            start.hash.label("start_structure_hash"),
            start.charge.label("charge_e"),
            start.multiplicity,
            MDRun.start_origin,
            MDRun.start_md_run_id,
            MDRun.temperature_K,
            MDRun.timestep_fs,
            MDRun.n_steps_requested,
            MDRun.n_steps_done,
            MDRun.stop_reason,
            MDRun.trajectory_path,
            MDRun.wall_time_s,
            MDRun.created_at,
        )
        .join(it, it.id == MDRun.iteration_id)
        .join(start, start.id == MDRun.start_structure_id)
        .outerjoin(model, model.id == MDRun.model_id)
        .where(MDRun.campaign_id == campaign_id)
        .order_by(MDRun.id)
    )
    return [dict(r._mapping) for r in rows]


def models(session: Session, campaign_id: int) -> list[dict[str, Any]]:
    """The campaign's models: version, parent, iteration, checkpoint, label counts and every metric
    (flat columns, units in their names)."""
    it, parent = aliased(Iteration), aliased(Model)
    rows = session.execute(
        text(
            "SELECT model_id, SUM(CASE WHEN split = 'train' THEN 1 ELSE 0 END) AS n_train, "
            "SUM(CASE WHEN split = 'valid' THEN 1 ELSE 0 END) AS n_valid FROM model_training_member "
            "WHERE model_id IN (SELECT id FROM model WHERE campaign_id = :c) GROUP BY model_id"
        ),
        {"c": campaign_id},
    ).all()
    counts = {r.model_id: (r.n_train, r.n_valid) for r in rows}
    out = []
    for m, index, parent_version in session.execute(
        select(Model, it.index, parent.version)
        .outerjoin(it, it.id == Model.iteration_id)
        .outerjoin(parent, parent.id == Model.parent_id)
        .where(Model.campaign_id == campaign_id)
        .order_by(Model.version)
    ):
        n_train, n_valid = counts.get(m.id, (0, 0))
        row = {
            "model_id": m.id,
            "version": m.version,
            "iteration_index": index,
            "parent_version": parent_version,
            "kind": m.kind,
            "n_train_labels": n_train,
            "n_valid_labels": n_valid,
            "checkpoint_path": m.checkpoint_path,
            "checkpoint_sha256": m.checkpoint_sha256,
            "created_at": m.created_at,
        }
        row.update({f"metric_{k}": v for k, v in (m.metrics or {}).items()})
        out.append(row)
    return out


#: The tables ``ionflow export`` writes besides datasets.
TABLES = {"decisions": decisions, "calculations": calculations, "md-runs": md_runs, "models": models}


def _labelled(session: Session, model: Model, query: Any) -> list[tuple[Calculation, Structure, dict[str, Any]]]:
    joined = aliased(Iteration)
    rows = session.execute(
        query.add_columns(
            CampaignStructure.origin, joined.index, CampaignStructure.md_run_id, CampaignStructure.md_step
        )
        .join(Structure, Structure.id == Calculation.structure_id)
        .outerjoin(
            CampaignStructure,
            (CampaignStructure.structure_id == Structure.id) & (CampaignStructure.campaign_id == model.campaign_id),
        )
        .outerjoin(joined, joined.id == CampaignStructure.iteration_id)
        .order_by(Calculation.id)
    ).all()
    out = []
    for calculation, structure, split, origin, index, md_run_id, md_step in rows:
        info = {
            "calculation_id": calculation.id,
            "structure_hash": structure.hash,
            "split": split,
            "origin": origin,
            "iteration": index,
            "md_run_id": md_run_id,
            "md_step": md_step,
        }
        out.append((calculation, structure, info))
    return out


def training_members(
    session: Session, model: Model, split: str | None = None
) -> list[tuple[Calculation, Structure, dict[str, Any]]]:
    """(calculation, structure, info) of each label a model was fitted on (``split`` train or
    valid; None: both); info holds calculation id, structure hash, split, origin, iteration index,
    MD run and step."""
    query = (
        select(Calculation, Structure, TrainingMember.split)
        .join(TrainingMember, TrainingMember.calculation_id == Calculation.id)
        .where(TrainingMember.model_id == model.id)
    )
    if split is not None:
        query = query.where(TrainingMember.split == split)
    return _labelled(session, model, query)


def test_members(session: Session, model: Model) -> list[tuple[Calculation, Structure, dict[str, Any]]]:
    """The labelled test structures a model was evaluated on when it was trained: members of a
    test origin that had joined the campaign by the model's iteration, labelled at the model's
    level of theory (a test file's own labels live in that file, not here)."""
    settings = session.scalar(
        select(Calculation.settings_hash)
        .join(TrainingMember, TrainingMember.calculation_id == Calculation.id)
        .where(TrainingMember.model_id == model.id)
        .limit(1)
    )
    iteration = session.get(Iteration, model.iteration_id) if model.iteration_id is not None else None
    joined = aliased(Iteration)
    by_then = select(CampaignStructure.structure_id).where(
        CampaignStructure.campaign_id == model.campaign_id, CampaignStructure.origin.in_(TEST_ORIGINS)
    )
    if iteration is not None:
        by_then = by_then.join(joined, joined.id == CampaignStructure.iteration_id).where(
            joined.index <= iteration.index
        )
    query = select(Calculation, Structure, literal("test")).where(
        Calculation.settings_hash == settings,
        Calculation.status == "ok",
        Calculation.structure_id.in_(by_then),
    )
    return _labelled(session, model, query)
