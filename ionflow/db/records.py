"""What a campaign writes and reads back: structures, calculations, labelled data.

These functions are the campaign's vocabulary over the ORM. Each takes an open
session and leaves committing to the caller, so a step can make several writes
in one transaction (all or nothing when a process dies).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from ase import Atoms
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

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
    utcnow,
)
from ionflow.db.objects import ObjectStore
from ionflow.db.queries import TEST_ORIGINS, asked_to_label
from ionflow.db.session import session_scope
from ionflow.platform.structures import (
    charge_of,
    labelled_copy,
    multiplicity_of,
    structure_hash,
)


class CampaignMismatch(ValueError):
    """A campaign of that name exists but computes something else."""


def open_campaign(session: Session, name: str, config: dict[str, Any], config_hash: str, workdir: str) -> Campaign:
    """The campaign called ``name``: created, or reopened for resuming if its science is unchanged."""
    campaign = session.scalar(select(Campaign).where(Campaign.name == name))
    if campaign is None:
        campaign = Campaign(name=name, config=config, config_hash=config_hash, workdir=workdir, status="running")
        session.add(campaign)
        session.flush()
        return campaign
    if campaign.config_hash != config_hash:
        raise CampaignMismatch(
            f"campaign {name!r} already exists in this database with different settings "
            f"(system, reference, model, training, bootstrap, explore or selection changed); "
            f"resume it with its original file, or give the new campaign another name"
        )
    campaign.config = config  # iterations / max_labels may grow on resume
    campaign.status = "running"
    return campaign


def iteration_row(session: Session, campaign_id: int, index: int) -> Iteration:
    """The iteration ``index`` of a campaign, created (status ``started``) if new."""
    row = session.scalar(select(Iteration).where(Iteration.campaign_id == campaign_id, Iteration.index == index))
    if row is None:
        row = Iteration(campaign_id=campaign_id, index=index, status="started")
        session.add(row)
        session.flush()
    return row


def add_structure(
    session: Session,
    store: ObjectStore,
    atoms: Atoms,
    origin: str,
    campaign_id: int,
    iteration_id: int | None = None,
    md_run_id: int | None = None,
    md_step: int | None = None,
) -> Structure:
    """The row of ``atoms`` (by content hash), made a member of campaign ``campaign_id``.

    The structure is stored and inserted if it is new to the database; one that
    another campaign met first is reused, so its calculations are never repeated.
    Its membership of this campaign records ``origin``, ``iteration_id`` (the
    iteration that brought it in), ``md_run_id`` and ``md_step`` (the run and step it was sampled at);
    if it is already a member, that first membership is kept unchanged.
    """
    h = structure_hash(atoms)
    row = session.scalar(select(Structure).where(Structure.hash == h))
    if row is None:
        # Insert-if-absent in one statement: writers in other processes (other Prefect tasks,
        # other campaigns sharing the database) may insert the same structure at the same
        # moment; exactly one row results and every writer gets it.
        path = store.put_structure(atoms)
        insert_ignore(
            session,
            Structure,
            {
                "hash": h,
                "formula": atoms.get_chemical_formula(),
                "n_atoms": len(atoms),
                "charge": charge_of(atoms),
                "multiplicity": multiplicity_of(atoms),
                "path": path,
                "created_at": utcnow(),
            },
            ["hash"],
        )
        row = session.scalar(select(Structure).where(Structure.hash == h))
    elif not store.path(row.path).exists():
        # met first by a campaign with another object store: this one must hold the file too
        store.put_structure(atoms)
    if membership(session, campaign_id, row.id) is None:
        insert_ignore(
            session,
            CampaignStructure,
            {
                "campaign_id": campaign_id,
                "structure_id": row.id,
                "iteration_id": iteration_id,
                "md_run_id": md_run_id,
                "md_step": md_step,
                "origin": origin,
            },
            ["campaign_id", "structure_id"],
        )
    return row


def insert_ignore(session: Session, model: type, values: dict[str, Any], unique: list[str]) -> None:
    """``INSERT ... ON CONFLICT (unique) DO NOTHING`` on SQLite and PostgreSQL: a row that a
    concurrent writer inserted first is kept, with no error and no duplicate."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ValueError(f"ionflow's provenance database is SQLite or PostgreSQL, not {dialect}")
    session.execute(insert(model).values(**values).on_conflict_do_nothing(index_elements=unique))


def membership(session: Session, campaign_id: int, structure_id: int) -> CampaignStructure | None:
    """Why and when the structure entered the campaign, or None if it is not a member."""
    return session.scalar(
        select(CampaignStructure).where(
            CampaignStructure.campaign_id == campaign_id, CampaignStructure.structure_id == structure_id
        )
    )


def calculation_for(session: Session, structure_id: int, settings_hash: str) -> Calculation | None:
    return session.scalar(
        select(Calculation).where(Calculation.structure_id == structure_id, Calculation.settings_hash == settings_hash)
    )


def _as_run(settings: dict[str, Any], result: Any) -> dict[str, Any]:
    """The settings as the calculation ran them: with its charge scheme, and what its run did
    (SCF attempts, retries with changed settings), when the adapter says."""
    out = dict(settings)
    if result.charge_scheme:
        out["charge_scheme"] = result.charge_scheme
    if result.extra:
        out["run"] = json.loads(json.dumps(result.extra, default=str))
    return out


def record_calculation(
    session: Session,
    store: ObjectStore,
    structure: Structure,
    result: Any,
    adapter: str,
    settings: dict[str, Any],
    iteration_id: int | None,
    remote_job_id: int | None = None,
    aiida_uuid: str | None = None,
) -> Calculation:
    """Insert one reference result (a ``LabelResult``); arrays go to the object store. A result
    computed remotely (``remote_job_id``) keeps its run folder as given (``COMPUTER:/path``)."""
    arrays = {
        key: np.asarray(value, dtype=float)
        for key in ("forces", "stress", "dipole", "charges")
        if (value := getattr(result, key)) is not None
    }
    results_path = results_sha = None
    if arrays and result.status == "ok":
        results_path, results_sha = store.put_arrays(arrays)
    row = Calculation(
        structure_id=structure.id,
        adapter=adapter,
        code_version=f"{result.code} {result.code_version}",
        settings_hash=result.settings_hash,
        settings=_as_run(settings, result),
        status=result.status,
        energy=result.energy if result.status == "ok" else None,
        results_path=results_path,
        results_sha256=results_sha,
        wall_time_s=float(result.wall_time_s),
        cpu_time_s=None if result.cpu_time_s is None else float(result.cpu_time_s),
        error=result.error,
        host=result.host,
        run_dir=result.run_dir if remote_job_id is not None else store.relative(result.run_dir),
        iteration_id=iteration_id,
        created_at=utcnow(),
        remote_job_id=remote_job_id,
        aiida_uuid=aiida_uuid,
    )
    session.add(row)
    session.flush()
    return row


def record_or_adopt(
    sessions: sessionmaker[Session],
    store: ObjectStore,
    structure_id: int,
    result: Any,
    adapter: str,
    settings: dict[str, Any],
    iteration_id: int | None,
    **remote: Any,
) -> bool:
    """Commit one reference result in its own transaction; True when it was recorded (``remote``:
    ``remote_job_id`` and ``aiida_uuid`` of a result computed through AiiDA).

    When a concurrent writer (another task, another campaign sharing the database) recorded a
    calculation of the same structure at the same level of theory first, the unique key
    ``(structure_id, settings_hash)`` refuses this one: the first stands and is adopted
    (its results copied into ``store``), and False is returned. Never a duplicate row.
    """
    try:
        with session_scope(sessions) as session:
            structure = session.get(Structure, structure_id)
            record_calculation(session, store, structure, result, adapter, settings, iteration_id, **remote)
        return True
    except IntegrityError:
        with session_scope(sessions) as session:
            existing = calculation_for(session, structure_id, result.settings_hash)
            if existing is None:
                raise
            adopt_calculation(session, store, existing)
        return False


def labelled_atoms(store: ObjectStore, structure: Structure, calculation: Calculation) -> Atoms:
    """The structure with its reference labels as ``REF_*`` keys (for training and datasets)."""
    if calculation.status != "ok" or calculation.results_path is None or calculation.energy is None:
        raise ValueError(f"calculation {calculation.id} has no usable label (status {calculation.status})")
    atoms = store.get_structure(structure.path)
    arrays = store.get_arrays(calculation.results_path)
    extra = {k: arrays.get(k) for k in ("dipole", "charges", "stress")}
    out = labelled_copy(atoms, calculation.energy, arrays["forces"], **extra)
    out.info["structure_hash"] = structure.hash
    out.info["calculation_id"] = calculation.id
    out.info["settings_hash"] = calculation.settings_hash
    return out


def adopt_calculation(session: Session, store: ObjectStore, calculation: Calculation) -> None:
    """Make a calculation made in another campaign's folder readable from ``store``.

    Campaigns sharing a database share calculations (one per structure and level of
    theory), but each keeps its own object store: a campaign's folder. The results
    file is copied, checked against its sha256, from the folder of the campaign that
    computed it (or, failing that, of any campaign in the database). Nothing is
    copied when ``store`` has it already or the calculation has no results.
    """
    relpath, sha = calculation.results_path, calculation.results_sha256
    if relpath is None or sha is None or store.path(relpath).exists():
        return
    computed_by = session.scalar(
        select(Campaign.workdir)
        .join(Iteration, Iteration.campaign_id == Campaign.id)
        .where(Iteration.id == calculation.iteration_id)
    )
    everyone = session.scalars(select(Campaign.workdir).order_by(Campaign.id)).all()
    for workdir in dict.fromkeys(w for w in (computed_by, *everyone) if w):
        source = ObjectStore(workdir)  # a campaign's folder is its object-store root
        if source.root != store.root and source.verify(relpath, sha):
            store.copy_from(source, relpath)
            if store.verify(relpath, sha):
                return
    raise FileNotFoundError(
        f"the results of calculation {calculation.id} ({relpath}) are in no campaign folder of this database; "
        f"it is recorded as done, so it will not be computed again"
    )


def labelled_set(
    session: Session, store: ObjectStore, campaign_id: int, settings_hash: str, test: bool
) -> list[tuple[Calculation, Atoms]]:
    """Every usable label of the campaign at one level of theory: the test set (``test=True``:
    members of an origin in :data:`~ionflow.db.queries.TEST_ORIGINS`) or the training pool (every
    other member the campaign asked to label: MD candidates only once it chose them, see
    :func:`~ionflow.db.queries.asked_to_label`). A calculation that another campaign sharing
    the database made counts as the campaign's own; unconverged and failed ones never appear.
    Each frame's ``info["origin"]`` says how it joined the campaign."""
    origin_clause = (
        CampaignStructure.origin.in_(TEST_ORIGINS) if test else CampaignStructure.origin.not_in(TEST_ORIGINS)
    )
    rows = session.execute(
        select(Calculation, Structure, CampaignStructure.origin)
        .join(Structure, Calculation.structure_id == Structure.id)
        .join(CampaignStructure, CampaignStructure.structure_id == Structure.id)
        .where(
            CampaignStructure.campaign_id == campaign_id,
            asked_to_label(campaign_id),
            Calculation.settings_hash == settings_hash,
            Calculation.status == "ok",
            origin_clause,
        )
        .order_by(Calculation.id)
    ).all()
    out = []
    for calc, struct, origin in rows:
        atoms = labelled_atoms(store, struct, calc)
        atoms.info["origin"] = origin
        out.append((calc, atoms))
    return out


def record_md_run(session: Session, **columns: Any) -> MDRun:
    """Add one walker's MD run (columns of :class:`MDRun`); flushed, so its id is known."""
    run = MDRun(**columns)
    session.add(run)
    session.flush()
    return run


def move_to_test_set(session: Session, campaign_id: int, iteration_id: int, structure_ids: list[int]) -> None:
    """Hold out MD frames an iteration sampled for the campaign's test set: their membership's
    origin becomes ``test-md`` (iteration and MD run kept), before any selection decision."""
    if structure_ids:
        session.execute(
            update(CampaignStructure)
            .where(
                CampaignStructure.campaign_id == campaign_id,
                CampaignStructure.iteration_id == iteration_id,
                CampaignStructure.origin == "md",
                CampaignStructure.structure_id.in_(structure_ids),
            )
            .values(origin="test-md")
        )


def record_decision(session: Session, **columns: Any) -> SelectionDecision:
    """Add one selection decision (columns of :class:`SelectionDecision`: score, threshold,
    chosen or not and why)."""
    decision = SelectionDecision(**columns)
    session.add(decision)
    return decision


def record_model(session: Session, splits: dict[int, str], **columns: Any) -> Model:
    """Add a trained model (columns of :class:`Model`) and its training set: one
    :class:`TrainingMember` per calculation id of ``splits``, whose value is ``train`` or ``valid``."""
    model = Model(**columns)
    session.add(model)
    session.flush()
    for calculation_id, split in splits.items():
        session.add(TrainingMember(model_id=model.id, calculation_id=calculation_id, split=split))
    return model


def close_iteration(iteration: Iteration, metrics: dict[str, Any] | None = None) -> None:
    """Mark an iteration done now, merging ``metrics`` into its metrics."""
    if metrics is not None:
        iteration.metrics = dict(iteration.metrics or {}, **metrics)
    iteration.status = "done"
    iteration.finished_at = utcnow()


def set_campaign_status(session: Session, campaign_id: int, status: str) -> Campaign:
    """Set a campaign's status (``running``, ``finished``, ``stopped``, ...); return it."""
    campaign = session.get(Campaign, campaign_id)
    campaign.status = status
    return campaign
