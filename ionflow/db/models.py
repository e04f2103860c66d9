"""The provenance schema: one ORM class per thing a campaign records.

Every row says where a thing came from (campaign, iteration, MD run, parent
model). Structures and their calculations are content, shared by all campaigns
in a database; a campaign's view of them is its ``campaign_structure`` rows.
Big arrays live in the content-addressed object store (:mod:`ionflow.db.objects`)
and rows hold only their relative paths and sha256.
Timestamps are timezone-aware UTC. Units: energies eV, forces eV/Å,
temperatures K, time steps fs, wall times s.

The schema is created by the Alembic migrations in ``migrations/versions``,
never by ``metadata.create_all``; a test checks that the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: Constraint names are fixed by convention so that migrations can refer to them
#: (SQLite batch operations and PostgreSQL ``DROP CONSTRAINT`` need names).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

CAMPAIGN_STATUSES = ("running", "finished", "stopped", "failed")
CALCULATION_STATUSES = ("ok", "failed", "unconverged", "timeout")
TRAINING_SPLITS = ("train", "valid")
#: Why a selection decision went the way it did (``selection_decision.reason_code``); the first
#: three choose the frame, the rest do not. ``reason`` keeps the human-readable sentence.
REASON_CODES = (
    "uncertain",  # uncertainty strategy: spread in the trust window, among the most uncertain
    "random_pick",  # random strategy: drawn
    "diverse",  # diverse strategy: largest spread x novelty
    "trusted",  # spread below the threshold
    "above_ceiling",  # spread at or above the ceiling: likely unphysical
    "already_labelled",  # same structure hash as a label of the campaign
    "near_duplicate",  # within min_distance of a labelled or chosen frame
    "budget",  # the iteration's per_iteration frames were already chosen
    "not_drawn",  # random strategy: not drawn
    "covered",  # diverse strategy: novelty at most min_novelty
    "held_out",  # drawn for the test set before selection
)
#: Where an MD walker's start structure came from (``md_run.start_origin``).
START_ORIGINS = ("rattle", "previous_run", "unknown")
PREFECT_RUN_KINDS = ("flow", "task")
SELECTION_STRATEGIES = ("uncertainty", "random", "diverse")
#: A remote job's life (``remote_job.state``): its row is written before it is submitted, so a
#: campaign killed in between finds it again (by its key) instead of submitting it twice.
REMOTE_JOB_STATES = ("submitting", "running", "collected")
REMOTE_ENGINES = ("aiida",)

Hash = String(64)  # a sha256 hex digest


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware.

    SQLite keeps no zone with a DATETIME, so values are converted to UTC on the way
    in and marked UTC on the way out; PostgreSQL stores ``timestamptz``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: ionflow stores timezone-aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class Campaign(Base):
    """One active-learning campaign: a config, a working folder and its iterations."""

    __tablename__ = "campaign"
    __table_args__ = (CheckConstraint(_one_of("status", CAMPAIGN_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    config: Mapped[dict[str, Any]]  # the validated campaign config
    config_hash: Mapped[str] = mapped_column(Hash)
    status: Mapped[str] = mapped_column(default="running")
    workdir: Mapped[str]  # absolute path of the campaign folder
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    prefect_flow_run_id: Mapped[str | None]  # a reference only; the database is the truth

    iterations: Mapped[list[Iteration]] = relationship(back_populates="campaign", order_by="Iteration.index")
    models: Mapped[list[Model]] = relationship(back_populates="campaign", order_by="Model.version")
    members: Mapped[list[CampaignStructure]] = relationship(back_populates="campaign", order_by="CampaignStructure.id")


class Iteration(Base):
    """One pass of explore -> select -> label -> train -> evaluate."""

    __tablename__ = "iteration"
    # the unique constraint's leading column also indexes campaign_id
    __table_args__ = (UniqueConstraint("campaign_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"))
    index: Mapped[int]  # 0, 1, 2, ... within the campaign
    status: Mapped[str] = mapped_column(default="started")  # started, explored, selected, labelled, trained, done
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    metrics: Mapped[dict[str, Any] | None]  # see ionflow.db.metrics: flat, units in the keys
    stop_reason: Mapped[str | None] = mapped_column(Text)  # why the campaign stopped at this iteration
    # the campaign flow run that last worked on the iteration (all runs: PrefectRun)
    prefect_flow_run_id: Mapped[str | None]
    # what selection ran with (None: iteration 0, or not selected yet)
    selection_strategy: Mapped[str | None]
    selection_threshold: Mapped[float | None]  # eV/Å
    selection_ceiling: Mapped[float | None]  # eV/Å
    selection_budget: Mapped[int | None]  # frames at most (selection.per_iteration)
    selection_min_distance: Mapped[float | None]  # Å (uncertainty)
    selection_min_novelty: Mapped[float | None]  # dimensionless (diverse)
    selection_seed: Mapped[int | None]  # random draws of this iteration (random strategy)
    selection_held_out: Mapped[int | None]  # frames asked for the test set (test.held_out_per_iteration)

    campaign: Mapped[Campaign] = relationship(back_populates="iterations")
    md_runs: Mapped[list[MDRun]] = relationship(back_populates="iteration")
    decisions: Mapped[list[SelectionDecision]] = relationship(back_populates="iteration")
    models: Mapped[list[Model]] = relationship(back_populates="iteration")


class Structure(Base):
    """A geometry with its charge state, identified by its content hash.

    A structure is content, shared by every campaign in the database that meets it
    (so a calculation of it is never repeated, whoever asks); the atoms live in the
    object store at ``path`` (extxyz). Which campaigns it belongs to, and why, is in
    :class:`CampaignStructure`.
    """

    __tablename__ = "structure"

    id: Mapped[int] = mapped_column(primary_key=True)
    hash: Mapped[str] = mapped_column(Hash, unique=True)  # ionflow.platform.structures.structure_hash
    formula: Mapped[str]
    n_atoms: Mapped[int]
    charge: Mapped[int]  # total charge, e
    multiplicity: Mapped[int]  # 2S+1
    path: Mapped[str]  # extxyz file, relative to the object-store root
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    memberships: Mapped[list[CampaignStructure]] = relationship(back_populates="structure")
    calculations: Mapped[list[Calculation]] = relationship(back_populates="structure")


class CampaignStructure(Base):
    """A structure's membership of one campaign: when and how it entered that campaign.

    Per-campaign facts live here rather than on :class:`Structure`, because two
    campaigns sharing a database may meet the same structure (identical bootstrap
    rattles, say) for different reasons. ``origin`` is ``initial`` (bootstrap
    training pool), ``test`` (the campaign's fixed test set), ``md`` (a frame
    sampled by ``md_run``), ``md-start`` (a walker's start) or ``user``; the first
    membership of a structure in a campaign is kept, never overwritten.
    """

    __tablename__ = "campaign_structure"
    # the unique constraint's leading column also indexes campaign_id
    __table_args__ = (UniqueConstraint("campaign_id", "structure_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"))
    structure_id: Mapped[int] = mapped_column(ForeignKey("structure.id"), index=True)
    # the iteration that brought it into the campaign (None: added outside the loop)
    iteration_id: Mapped[int | None] = mapped_column(ForeignKey("iteration.id"), index=True)
    md_run_id: Mapped[int | None] = mapped_column(ForeignKey("md_run.id"), index=True)  # the run it was sampled from
    md_step: Mapped[int | None]  # the MD step (1, 2, ...) of md_run at which it was sampled
    origin: Mapped[str]  # initial, test, md, md-start, user, ...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    campaign: Mapped[Campaign] = relationship(back_populates="members")
    structure: Mapped[Structure] = relationship(back_populates="memberships")
    iteration: Mapped[Iteration | None] = relationship()
    md_run: Mapped[MDRun | None] = relationship(back_populates="samples")


class Calculation(Base):
    """One reference (DFT) calculation of one structure at one level of theory.

    ``(structure_id, settings_hash)`` is unique: it is the resume key, so a
    calculation is never repeated. Forces (eV/Å) and the other arrays are in the
    npz at ``results_path``; ``energy`` is in eV.
    """

    __tablename__ = "calculation"
    # the unique constraint's leading column also indexes structure_id
    __table_args__ = (
        UniqueConstraint("structure_id", "settings_hash"),
        CheckConstraint(_one_of("status", CALCULATION_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    structure_id: Mapped[int] = mapped_column(ForeignKey("structure.id"))
    adapter: Mapped[str]
    code_version: Mapped[str]
    settings_hash: Mapped[str] = mapped_column(Hash, index=True)
    settings: Mapped[dict[str, Any]]
    status: Mapped[str]  # ok, failed, unconverged, timeout
    energy: Mapped[float | None]  # eV
    results_path: Mapped[str | None]  # npz in the object store
    results_sha256: Mapped[str | None] = mapped_column(Hash)
    wall_time_s: Mapped[float] = mapped_column(default=0.0)
    cpu_time_s: Mapped[float | None]  # the code's CPU seconds, all threads and processes; None: unknown
    error: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None]
    run_dir: Mapped[str | None]  # relative to the folder of the campaign whose iteration ran it; COMPUTER:/path remote
    iteration_id: Mapped[int | None] = mapped_column(ForeignKey("iteration.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    remote_job_id: Mapped[int | None] = mapped_column(ForeignKey("remote_job.id"), index=True)
    aiida_uuid: Mapped[str | None] = mapped_column(String(36))  # the AiiDA CalcJob node that computed it

    structure: Mapped[Structure] = relationship(back_populates="calculations")
    iteration: Mapped[Iteration | None] = relationship()


class Model(Base):
    """A trained model version; ``parent`` is the model it was fine-tuned from."""

    __tablename__ = "model"
    # the unique constraint's leading column also indexes campaign_id
    __table_args__ = (UniqueConstraint("campaign_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"))
    iteration_id: Mapped[int | None] = mapped_column(ForeignKey("iteration.id"), index=True)
    version: Mapped[int]
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model.id"), index=True)
    kind: Mapped[str]
    hyperparameters: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any] | None]
    checkpoint_path: Mapped[str]  # relative to the object-store root
    checkpoint_sha256: Mapped[str] = mapped_column(Hash)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    campaign: Mapped[Campaign] = relationship(back_populates="models")
    iteration: Mapped[Iteration | None] = relationship(back_populates="models")
    parent: Mapped[Model | None] = relationship(remote_side=[id], back_populates="children")
    children: Mapped[list[Model]] = relationship(back_populates="parent")
    training_members: Mapped[list[TrainingMember]] = relationship(back_populates="model", cascade="all, delete-orphan")


class TrainingMember(Base):
    """A calculation in a model's training (``train``) or validation (``valid``) set."""

    __tablename__ = "model_training_member"
    __table_args__ = (CheckConstraint(_one_of("split", TRAINING_SPLITS), name="split"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("model.id"), primary_key=True)
    calculation_id: Mapped[int] = mapped_column(ForeignKey("calculation.id"), primary_key=True, index=True)
    split: Mapped[str] = mapped_column(default="train")

    model: Mapped[Model] = relationship(back_populates="training_members")
    calculation: Mapped[Calculation] = relationship()


class MDRun(Base):
    """One MD walker run by a model from a start structure, and why it stopped."""

    __tablename__ = "md_run"
    __table_args__ = (CheckConstraint(_one_of("start_origin", START_ORIGINS), name="start_origin"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"), index=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iteration.id"), index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("model.id"), index=True)
    start_structure_id: Mapped[int] = mapped_column(ForeignKey("structure.id"), index=True)
    # rattle: a fresh rattle of the system's structure; previous_run: the last frame of
    # start_md_run_id (the same walker's run of the iteration before); unknown: recorded before 0003
    start_origin: Mapped[str] = mapped_column(default="rattle")
    start_md_run_id: Mapped[int | None] = mapped_column(ForeignKey("md_run.id"))
    walker: Mapped[int]
    temperature_K: Mapped[float]
    timestep_fs: Mapped[float]
    n_steps_requested: Mapped[int]
    n_steps_done: Mapped[int]
    stop_reason: Mapped[str]
    trajectory_path: Mapped[str | None]  # relative to the object-store root
    wall_time_s: Mapped[float] = mapped_column(default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    campaign: Mapped[Campaign] = relationship()
    iteration: Mapped[Iteration] = relationship(back_populates="md_runs")
    model: Mapped[Model | None] = relationship()
    start_structure: Mapped[Structure] = relationship()
    # the sampled frames, as memberships of the run's campaign
    samples: Mapped[list[CampaignStructure]] = relationship(back_populates="md_run")


class SelectionDecision(Base):
    """Why a candidate structure was (or was not) sent for labelling in an iteration."""

    __tablename__ = "selection_decision"
    # the unique constraint's leading column also indexes iteration_id
    __table_args__ = (
        UniqueConstraint("iteration_id", "structure_id"),
        CheckConstraint(_one_of("reason_code", REASON_CODES), name="reason_code"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iteration.id"))
    structure_id: Mapped[int] = mapped_column(ForeignKey("structure.id"), index=True)
    md_run_id: Mapped[int | None] = mapped_column(ForeignKey("md_run.id"), index=True)
    score: Mapped[float]  # force uncertainty, eV/Å
    energy_uncertainty: Mapped[float | None]  # eV
    threshold: Mapped[float]  # eV/Å, same measure as score
    chosen: Mapped[bool]
    reason_code: Mapped[str]  # one of REASON_CODES
    reason: Mapped[str]  # the same, as a sentence with its numbers
    # place (1 = first) in the order the strategy considered the iteration's frames: spread high to
    # low (uncertainty), the random permutation (random), picks then the rest by spread (diverse);
    # None for held-out frames and for decisions recorded before revision 0003 by other strategies
    rank: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    iteration: Mapped[Iteration] = relationship(back_populates="decisions")
    structure: Mapped[Structure] = relationship()
    md_run: Mapped[MDRun | None] = relationship()


class PrefectRun(Base):
    """A Prefect flow run or task run that worked on a campaign (the history; the Prefect server
    may be temporary, and is gone when its run ends: ``temporary_server``)."""

    __tablename__ = "prefect_run"
    __table_args__ = (
        UniqueConstraint("run_id"),
        CheckConstraint(_one_of("kind", PREFECT_RUN_KINDS), name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"), index=True)
    iteration_id: Mapped[int | None] = mapped_column(ForeignKey("iteration.id"), index=True)
    run_id: Mapped[str]  # Prefect's UUID of the run
    flow_run_id: Mapped[str | None]  # for a task run: the flow run it ran in
    kind: Mapped[str]  # flow, task
    name: Mapped[str]  # Prefect's run name (task runs: the step and iteration)
    api_url: Mapped[str | None]  # the Prefect API that holds the run
    temporary_server: Mapped[bool]  # the API was a server started for this process only
    state: Mapped[str]  # RUNNING, COMPLETED, FAILED (Prefect's state type); RUNNING if the process died
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]

    iteration: Mapped[Iteration | None] = relationship()


class RemoteJob(Base):
    """A batch of reference calculations submitted to a remote engine (an AiiDA calculation job).

    The row is committed (``submitting``) before the job is submitted and the job carries ``key``
    (as its AiiDA label), so a campaign killed between the two finds the job again instead of
    submitting it twice; ``running`` once the node is known; ``collected`` once every structure
    of the batch has a calculation row.
    """

    __tablename__ = "remote_job"
    __table_args__ = (
        UniqueConstraint("key"),
        CheckConstraint(_one_of("state", REMOTE_JOB_STATES), name="state"),
        CheckConstraint(_one_of("engine", REMOTE_ENGINES), name="engine"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"), index=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iteration.id"), index=True)
    engine: Mapped[str]  # aiida
    key: Mapped[str]  # unique; the AiiDA node's label
    structure_ids: Mapped[list[int]] = mapped_column(JSON)  # the batch, in its order
    state: Mapped[str]  # submitting, running, collected
    profile: Mapped[str | None]  # AiiDA profile
    computer: Mapped[str | None]  # AiiDA computer label
    node_uuid: Mapped[str | None] = mapped_column(String(36))  # AiiDA CalcJob node
    node_pk: Mapped[int | None]
    exit_status: Mapped[int | None]  # the AiiDA process's exit status once it ended
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    submitted_at: Mapped[datetime | None]
    collected_at: Mapped[datetime | None]
