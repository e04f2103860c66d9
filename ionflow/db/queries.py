"""Read-side questions the CLI, the flows and the dashboard ask of the database.

Plain functions over a :class:`~sqlalchemy.orm.Session`. Each answers with a
fixed, small number of queries (aggregates and joins, never one query per row),
so they stay fast on campaigns with many thousands of structures.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, func, literal, or_, select, text
from sqlalchemy.orm import Session, aliased, joinedload

from ionflow.db.models import (
    Calculation,
    Campaign,
    CampaignStructure,
    Iteration,
    MDRun,
    Model,
    SelectionDecision,
    Structure,
    TrainingMember,
)

#: Parent chains longer than this are treated as corrupt (a cycle) and cut.
_MAX_LINEAGE_DEPTH = 10_000

#: Membership origins of structures a campaign only samples (MD frames, walker starts).
CANDIDATE_ORIGINS = ("md", "md-start")

#: Membership origins of the test set: bootstrap rattles (``test``), explored frames held out before
#: selection (``test-md``, which keep their MD run), and structures from ``test.file`` (``test-file``).
TEST_ORIGINS = ("test", "test-md", "test-file")


def asked_to_label(campaign_id: int) -> ColumnElement[bool]:
    """Condition on :class:`CampaignStructure` rows of campaign ``campaign_id``: the campaign
    asked for this member's label, so its calculation is one of the campaign's labels.

    True for every member except MD candidates (origins in :data:`CANDIDATE_ORIGINS`) that
    the campaign did not choose for labelling. A candidate that another campaign sharing
    the database labelled stays a candidate here until this campaign chooses it too (and
    then reuses that calculation): sharing a database changes what a campaign pays for its
    labels, never which labels it selects, trains on and counts.
    """
    chosen_here = (
        select(SelectionDecision.structure_id)
        .join(Iteration, SelectionDecision.iteration_id == Iteration.id)
        .where(Iteration.campaign_id == campaign_id, SelectionDecision.chosen.is_(True))
    )
    return or_(CampaignStructure.origin.not_in(CANDIDATE_ORIGINS), CampaignStructure.structure_id.in_(chosen_here))


def calculation_outcomes(
    session: Session, campaign_id: int, settings_hash: str, failures: int = 50
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """How the campaign's reference calculations at one level of theory ended: counts per
    status, and the first ``failures`` ones that did not end ``ok`` (structure, status, error,
    run folder, iteration), oldest first. Two queries."""
    mine = (
        select(Calculation.id)
        .join(CampaignStructure, CampaignStructure.structure_id == Calculation.structure_id)
        .where(
            CampaignStructure.campaign_id == campaign_id,
            asked_to_label(campaign_id),
            Calculation.settings_hash == settings_hash,
        )
    )
    counts = dict(
        session.execute(
            select(Calculation.status, func.count()).where(Calculation.id.in_(mine)).group_by(Calculation.status)
        ).all()
    )
    rows = session.execute(
        select(Calculation, Structure.hash, Iteration.index)
        .join(Structure, Calculation.structure_id == Structure.id)
        .outerjoin(Iteration, Calculation.iteration_id == Iteration.id)
        .where(Calculation.id.in_(mine), Calculation.status != "ok")
        .order_by(Calculation.id)
        .limit(failures)
    ).all()
    listed = [
        {
            "calculation_id": calc.id,
            "structure_id": calc.structure_id,
            "structure_hash": hash_,
            "iteration": index,
            "status": calc.status,
            "error": calc.error,
            "run_dir": calc.run_dir,
            "wall_time_s": calc.wall_time_s,
        }
        for calc, hash_, index in rows
    ]
    return counts, listed


def campaign_by_name(session: Session, name: str) -> Campaign | None:
    """The campaign called ``name``, or None."""
    return session.scalars(select(Campaign).where(Campaign.name == name)).one_or_none()


def find_calculation(session: Session, structure_hash: str, settings_hash: str) -> Calculation | None:
    """The calculation of the structure with ``structure_hash`` at ``settings_hash``, or None.

    This is the resume check: a hit (whatever its status) means the calculation was
    already run and must not be repeated.
    """
    stmt = (
        select(Calculation)
        .join(Calculation.structure)
        .where(Structure.hash == structure_hash, Calculation.settings_hash == settings_hash)
    )
    return session.scalars(stmt).one_or_none()


def iteration_table(session: Session, campaign_id: int) -> list[dict[str, Any]]:
    """One summary dict per iteration of a campaign, in iteration order.

    Keys: ``index``, ``status``; ``n_labels``: ok calculations of the campaign's labels
    (members it asked to label, see :func:`asked_to_label`; test set included) available
    by the end of this iteration, cumulative: one made in this campaign counts from the
    iteration that made it; one made outside any iteration, or by another campaign
    sharing the database, from the iteration that brought its structure into this
    campaign (from the start if none did); ``n_failed``: calculations of this
    iteration that did not end ``ok`` (failed, unconverged, timeout); ``n_selected``:
    structures chosen for labelling in this iteration; ``n_md_runs``; ``model_version``:
    the newest model trained in this iteration, or None; ``n_training_labels``: the labels that
    model was fitted on (training and validation sides), or None; ``reference_cpu_s``: CPU
    seconds of the reference calculations this campaign ran up to and including this iteration,
    failed ones included (a calculation whose CPU time is unknown counts its wall time), the cost
    axis of a learning curve; ``metrics`` (``{}`` if unset); ``model_metrics``: those of
    ``model_version`` (``{}`` if none; :mod:`ionflow.db.metrics`).
    """
    iterations = session.scalars(
        select(Iteration).where(Iteration.campaign_id == campaign_id).order_by(Iteration.index)
    ).all()
    in_campaign = select(Iteration.id).where(Iteration.campaign_id == campaign_id)
    index_of = {it.id: it.index for it in iterations}

    # ok labels by (iteration that computed them, iteration their structure joined the campaign);
    # either may be None or, for the first, another campaign's iteration
    ok_labels = session.execute(
        select(Calculation.iteration_id, CampaignStructure.iteration_id, func.count())
        .join(CampaignStructure, CampaignStructure.structure_id == Calculation.structure_id)
        .where(CampaignStructure.campaign_id == campaign_id, asked_to_label(campaign_id), Calculation.status == "ok")
        .group_by(Calculation.iteration_id, CampaignStructure.iteration_id)
    ).all()
    # the iteration index from which each group counts (None: from the start): a label is
    # usable once its structure is a member and it is computed, whichever came later
    available_from: list[tuple[int | None, int]] = []
    for computed_in, joined_in, n in ok_labels:
        known = [index_of[i] for i in (computed_in, joined_in) if i in index_of]
        available_from.append((max(known) if known else None, n))
    failed = _count_by_iteration(
        session, Calculation.iteration_id, Calculation.iteration_id.in_(in_campaign), Calculation.status != "ok"
    )
    selected = _count_by_iteration(
        session,
        SelectionDecision.iteration_id,
        SelectionDecision.iteration_id.in_(in_campaign),
        SelectionDecision.chosen.is_(True),
    )
    md_runs = _count_by_iteration(session, MDRun.iteration_id, MDRun.campaign_id == campaign_id)
    newest_of = (
        select(Model.iteration_id, func.max(Model.version).label("version"))
        .where(Model.campaign_id == campaign_id, Model.iteration_id.is_not(None))
        .group_by(Model.iteration_id)
        .subquery()
    )
    models = {
        iteration_id: (version, metrics)
        for iteration_id, version, metrics in session.execute(
            select(Model.iteration_id, Model.version, Model.metrics).join(
                newest_of,
                (Model.iteration_id == newest_of.c.iteration_id) & (Model.version == newest_of.c.version),
            )
        ).all()
    }

    training_labels = dict(
        session.execute(
            select(Model.iteration_id, func.count(TrainingMember.calculation_id))
            .join(TrainingMember, TrainingMember.model_id == Model.id)
            .where(Model.campaign_id == campaign_id, Model.iteration_id.is_not(None))
            .group_by(Model.iteration_id)
        ).all()
    )
    cpu_by_iteration = dict(
        session.execute(
            select(Calculation.iteration_id, func.sum(func.coalesce(Calculation.cpu_time_s, Calculation.wall_time_s)))
            .where(Calculation.iteration_id.in_(in_campaign))
            .group_by(Calculation.iteration_id)
        ).all()
    )

    table = []
    cpu_so_far = 0.0
    for it in iterations:
        n_labels = sum(n for start, n in available_from if start is None or start <= it.index)
        cpu_so_far += float(cpu_by_iteration.get(it.id) or 0.0)
        table.append(
            {
                "index": it.index,
                "status": it.status,
                "n_labels": n_labels,
                "n_failed": failed.get(it.id, 0),
                "n_selected": selected.get(it.id, 0),
                "n_md_runs": md_runs.get(it.id, 0),
                "model_version": models[it.id][0] if it.id in models else None,
                "n_training_labels": training_labels.get(it.id),
                "reference_cpu_s": cpu_so_far,
                "metrics": it.metrics or {},
                "model_metrics": (models[it.id][1] or {}) if it.id in models else {},
            }
        )
    return table


def _count_by_iteration(session: Session, iteration_id: Any, *where: Any) -> dict[int, int]:
    rows = session.execute(select(iteration_id, func.count()).where(*where).group_by(iteration_id))
    return dict(rows.all())


def follow_indexes(session: Session) -> None:
    """On PostgreSQL, for the session's transaction only, the planner cost of random reads
    recommended for SSDs: the default (4) models spinning disks and makes the planner scan the
    100k-row tables instead of following their structure_id indexes from a model's few thousand
    training members (measured: 28 ms of SQL against 11 ms). A no-op on SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL random_page_cost = 1.1"))


def model_ancestors(session: Session, model_id: int, columns: bool = False) -> list[Any]:
    """A model's parent, grandparent, ... (nearest first), in one recursive query: :class:`Model`
    rows, or with ``columns`` only their ``id``, ``version`` and ``kind`` (no JSON to decode)."""
    chain = (
        select(Model.id, Model.parent_id, literal(0).label("depth"))
        .where(Model.id == model_id)
        .cte("chain", recursive=True)
    )
    parent = aliased(Model)
    chain = chain.union_all(
        select(parent.id, parent.parent_id, chain.c.depth + 1).where(
            parent.id == chain.c.parent_id, chain.c.depth < _MAX_LINEAGE_DEPTH
        )
    )
    what = select(Model.id, Model.version, Model.kind) if columns else select(Model)
    rows = session.execute(what.join(chain, Model.id == chain.c.id).where(chain.c.depth > 0).order_by(chain.c.depth))
    return list(rows.all() if columns else rows.scalars().all())


def model_lineage(session: Session, model_id: int) -> dict[str, Any]:
    """Everything a model came from.

    Returns a dict with
      ``model``: the :class:`Model`;
      ``ancestors``: its parent, grandparent, ... (nearest first);
      ``members``: its :class:`TrainingMember` rows (``split`` is train/valid), each with
      ``calculation`` and ``calculation.structure`` loaded;
      ``calculations`` and ``structures``: those calculations and their structures;
      ``md_runs``: the MD runs the structures were sampled from in the model's campaign
      (their ``campaign_structure.md_run_id``);
      ``decisions``: the model's campaign's selection decisions about those structures.
    Raises ``LookupError`` if there is no model ``model_id``.
    """
    model = session.get(Model, model_id)
    if model is None:
        raise LookupError(f"no model with id {model_id}")
    follow_indexes(session)
    ancestors = model_ancestors(session, model_id)

    members = session.scalars(
        select(TrainingMember)
        .where(TrainingMember.model_id == model_id)
        .options(joinedload(TrainingMember.calculation).joinedload(Calculation.structure))
        .order_by(TrainingMember.calculation_id)
    ).all()
    calculations = [m.calculation for m in members]
    structures = list({c.structure.id: c.structure for c in calculations}.values())

    # Joins driven from the model's training members (a few thousand rows), so that the
    # planner walks the structure_id indexes of the big tables (candidates, decisions: one
    # row per sampled frame) instead of scanning them; no id lists, so no bound-parameter
    # limit however large the training set. Another campaign sharing the database may have
    # sampled and chosen the same structures: its runs and decisions are not this lineage.
    md_runs = session.scalars(
        select(MDRun)
        .where(
            MDRun.id.in_(
                select(CampaignStructure.md_run_id)
                .join(Calculation, Calculation.structure_id == CampaignStructure.structure_id)
                .join(TrainingMember, TrainingMember.calculation_id == Calculation.id)
                .where(TrainingMember.model_id == model_id, CampaignStructure.campaign_id == model.campaign_id)
            )
        )
        .order_by(MDRun.id)
    ).all()
    decisions = session.scalars(
        select(SelectionDecision)
        .join(Calculation, Calculation.structure_id == SelectionDecision.structure_id)
        .join(TrainingMember, TrainingMember.calculation_id == Calculation.id)
        .join(Iteration, SelectionDecision.iteration_id == Iteration.id)
        .where(TrainingMember.model_id == model_id, Iteration.campaign_id == model.campaign_id)
        .order_by(SelectionDecision.iteration_id, SelectionDecision.id)
    ).all()

    return {
        "model": model,
        "ancestors": list(ancestors),
        "members": list(members),
        "calculations": calculations,
        "structures": structures,
        "md_runs": list(md_runs),
        "decisions": list(decisions),
    }


# --- the questions the campaign's steps ask -------------------------------------------------


def campaigns_named(session: Session, name: str | None = None) -> list[Campaign]:
    """Every campaign of the database (``name`` None), or those called ``name``, oldest first."""
    query = select(Campaign).order_by(Campaign.id)
    if name is not None:
        query = query.where(Campaign.name == name)
    return list(session.scalars(query).all())


def newest_model(session: Session, campaign_id: int, before_index: int | None = None) -> Model | None:
    """The campaign's newest model (made in an iteration before ``before_index``, if given), or None."""
    query = select(Model).join(Iteration, Model.iteration_id == Iteration.id).where(Model.campaign_id == campaign_id)
    if before_index is not None:
        query = query.where(Iteration.index < before_index)
    return session.scalar(query.order_by(Model.version.desc()).limit(1))


def model_of_iteration(session: Session, iteration_id: int) -> Model | None:
    """The model trained in an iteration, or None (not trained yet, or nothing was labelled)."""
    return session.scalar(
        select(Model).where(Model.iteration_id == iteration_id).order_by(Model.version.desc()).limit(1)
    )


def md_runs_of_iteration(session: Session, campaign_id: int, index: int) -> list[MDRun]:
    """The MD runs of iteration ``index`` of a campaign, by walker."""
    return list(
        session.scalars(
            select(MDRun)
            .join(Iteration, MDRun.iteration_id == Iteration.id)
            .where(MDRun.campaign_id == campaign_id, Iteration.index == index)
            .order_by(MDRun.walker, MDRun.id)
        ).all()
    )


def md_candidates(session: Session, campaign_id: int, iteration_id: int) -> list[tuple[Structure, int | None]]:
    """The frames an iteration's MD sampled (members of origin ``md`` that joined the campaign in
    it), as (structure, MD run id), in structure id order."""
    rows = session.execute(
        select(Structure, CampaignStructure.md_run_id)
        .join(CampaignStructure, CampaignStructure.structure_id == Structure.id)
        .where(
            CampaignStructure.campaign_id == campaign_id,
            CampaignStructure.iteration_id == iteration_id,
            CampaignStructure.origin == "md",
        )
        .order_by(Structure.id)
    ).all()
    return [(row, md_run_id) for row, md_run_id in rows]


def decisions_of_iteration(session: Session, iteration_id: int) -> list[SelectionDecision]:
    """Every selection decision of an iteration, in the order they were recorded."""
    return list(
        session.scalars(
            select(SelectionDecision)
            .where(SelectionDecision.iteration_id == iteration_id)
            .order_by(SelectionDecision.id)
        ).all()
    )


def chosen_count(session: Session, iteration_id: int) -> int:
    """How many structures an iteration chose for labelling."""
    return session.scalar(
        select(func.count()).where(SelectionDecision.iteration_id == iteration_id, SelectionDecision.chosen.is_(True))
    )


def structures_to_label(session: Session, iteration: Iteration) -> list[Structure]:
    """Structures an iteration must have labels for (computed now or already), by id: the
    bootstrap's training structures and the test set's in iteration 0; after it, the chosen MD
    frames and those held out for the test set."""
    members = (
        select(Structure)
        .join(CampaignStructure, CampaignStructure.structure_id == Structure.id)
        .where(
            CampaignStructure.campaign_id == iteration.campaign_id,
            CampaignStructure.iteration_id == iteration.id,
            CampaignStructure.origin.in_(("initial", *TEST_ORIGINS)),
        )
    )
    chosen = (
        select(Structure)
        .join(SelectionDecision, SelectionDecision.structure_id == Structure.id)
        .where(SelectionDecision.iteration_id == iteration.id, SelectionDecision.chosen.is_(True))
    )
    rows = set(session.scalars(members).all())
    if iteration.index > 0:
        rows |= set(session.scalars(chosen).all())
    return sorted(rows, key=lambda row: row.id)


def usable_label_count(session: Session, campaign_id: int) -> int:
    """Usable (``ok``) labels of the campaign: computed by it or, for structures it asked to
    label, by another campaign sharing the database (see :func:`asked_to_label`)."""
    return session.scalar(
        select(func.count(Calculation.id))
        .join(CampaignStructure, CampaignStructure.structure_id == Calculation.structure_id)
        .where(
            CampaignStructure.campaign_id == campaign_id,
            asked_to_label(campaign_id),
            Calculation.status == "ok",
        )
    )
