"""The campaign file: pydantic models of the YAML, and every check made before work starts.

Everything a campaign needs is declared here once and validated at the edge
(:func:`load_config`); the rest of ionflow trusts a :class:`CampaignConfig`.
Units: Å, eV, fs, K.

Longer than ionflow's other modules on purpose: it is the campaign file's schema, and a user
(or a reviewer) reads every section, default, unit and bound in one place, top to bottom; the
functions at the end turn pydantic's errors into messages that name the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from ase import Atoms
from ase.data import atomic_numbers
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ionflow.platform.settings import ModelSettings, TrainingSettings
from ionflow.platform.structures import (
    charge_state_problem,
    overlap_problem,
    read_structures,
    with_charge_state,
)

#: Environment variable with the provenance database's URL, used when the campaign file has none.
DATABASE_URL_VARIABLE = "IONFLOW_DATABASE_URL"

#: Database backends ionflow's provenance schema and queries are written for.
DATABASE_BACKENDS = ("sqlite", "postgresql")

# Upper bounds that no sensible campaign reaches: a value past one is a typo (1e300 for 1e-3),
# refused at the edge instead of overflowing or running for years.
#: Largest count of structures, steps or calculations of any kind.
MAX_COUNT = 10_000_000
#: Largest temperature in K (thermostat); hotter than any chemistry a potential is fitted for.
MAX_TEMPERATURE_K = 10_000.0
#: Largest force spread in eV/Å (thresholds); ~1000x a large DFT force error, so it means "never".
MAX_FORCE_SPREAD = 1_000.0
#: Largest wall time of one calculation in s (30 days).
MAX_TIMEOUT_S = 30 * 86_400.0
#: Largest total charge in e, either sign.
MAX_CHARGE = 1_000


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored; NaN and
    infinity are refused in every number (``allow_inf_nan``), so no bound is passed by a NaN."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class InlineStructure(Strict):
    """A structure written out in the campaign file."""

    symbols: list[str] = Field(description="Chemical symbols, one per atom (e.g. ['O', 'H', 'H']).")
    positions: list[tuple[float, float, float]] = Field(description="Cartesian positions in Å, one row per atom.")
    cell: list[tuple[float, float, float]] | None = Field(None, description="3x3 cell in Å (rows are lattice vectors).")
    pbc: bool = Field(False, description="Periodic in all three directions (needs a cell).")

    @field_validator("symbols")
    @classmethod
    def _known_elements(cls, symbols: list[str]) -> list[str]:
        unknown = sorted({s for s in symbols if s not in atomic_numbers or s == "X"})
        if unknown:
            raise ValueError(f"unknown element(s): {', '.join(unknown)}")
        if not symbols:
            raise ValueError("a structure needs at least one atom")
        return symbols

    @model_validator(mode="after")
    def _shapes(self) -> InlineStructure:
        if len(self.positions) != len(self.symbols):
            raise ValueError(f"{len(self.symbols)} symbols but {len(self.positions)} positions")
        if self.pbc and self.cell is None:
            raise ValueError("pbc: true needs a cell")
        return self

    def to_atoms(self) -> Atoms:
        return Atoms(symbols=self.symbols, positions=self.positions, cell=self.cell, pbc=self.pbc)


#: Tags of the two forms of ``system.structure``; pydantic puts them in an error's path, and
#: :func:`describe_errors` leaves them out (``system.structure.symbols``, not ``...inline.symbols``).
_STRUCTURE_TAGS = ("inline", "file")


def _structure_kind(value: Any) -> str:
    """A mapping is an inline structure, anything else a path: errors then name one branch."""
    return _STRUCTURE_TAGS[0] if isinstance(value, (dict, InlineStructure)) else _STRUCTURE_TAGS[1]


StructureSource = Annotated[
    Annotated[InlineStructure, Tag(_STRUCTURE_TAGS[0])] | Annotated[Path, Tag(_STRUCTURE_TAGS[1])],
    Discriminator(_structure_kind),
]


class SystemConfig(Strict):
    """The chemical system: a starting structure, its total charge and spin multiplicity."""

    structure: StructureSource = Field(
        description="Starting structure: inline (symbols/positions) or a path to any ASE-readable file, "
        "relative to the campaign file."
    )
    charge: int = Field(0, ge=-MAX_CHARGE, le=MAX_CHARGE, description="Total charge in e.")
    multiplicity: int = Field(
        1, ge=1, le=2 * MAX_CHARGE, description="Spin multiplicity 2S+1 (at most the electron count plus one)."
    )

    def atoms(self) -> Atoms:
        """The starting structure with charge and multiplicity in ``info``."""
        if isinstance(self.structure, InlineStructure):
            atoms = self.structure.to_atoms()
        else:
            atoms = read_structures(self.structure, index="0")[0]
        return with_charge_state(atoms, self.charge, self.multiplicity)

    @model_validator(mode="after")
    def _physical(self) -> SystemConfig:
        if isinstance(self.structure, Path):
            if not self.structure.is_file():
                raise ValueError(f"structure file {self.structure} does not exist")
            try:
                read_structures(self.structure, index="0")
            except Exception as exc:  # ASE raises many types for unreadable files
                raise ValueError(f"cannot read structure file {self.structure}: {exc}") from exc
        atoms = self.atoms()
        problem = charge_state_problem(atoms.numbers, self.charge, self.multiplicity)
        if problem:
            raise ValueError(f"charge/multiplicity: {problem} (formula {atoms.get_chemical_formula()})")
        problem = overlap_problem(atoms)
        if problem:
            raise ValueError(f"structure: {problem}")
        return self


class DispatchConfig(Strict):
    """Where the reference calculations run: next to the label step (``local``), or as batches of
    AiiDA calculation jobs on a computer AiiDA knows (``aiida``: a cluster behind SSH and SLURM, or
    this machine). Not part of the science: a campaign gets the same results either way."""

    engine: Literal["local", "aiida"] = Field(
        "local", description="local: worker processes next to the label step; aiida: AiiDA calculation jobs."
    )
    profile: str | None = Field(None, description="AiiDA profile (default: AiiDA's default profile).")
    computer: str | None = Field(None, description="AiiDA computer (label) the jobs run on.")
    code: str | None = Field(
        None,
        description="AiiDA code (label, or label@computer) of the ionflow executable on that computer "
        "(an InstalledCode whose executable is `ionflow` of an ionflow install there).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="The jobs' metadata.options: resources, max_wallclock_seconds, queue_name, account, "
        "custom_scheduler_commands, prepend_text, ... (checked against the computer's scheduler before any work).",
    )
    batch_size: int = Field(10, ge=1, le=100_000, description="Structures per job.")
    poll_interval_s: float = Field(10.0, gt=0, le=3600, description="Seconds between two looks at running jobs.")
    max_wait_s: float | None = Field(
        None,
        gt=0,
        le=365 * 86_400.0,
        description="Stop waiting for running jobs after this long (the campaign ends with an error and collects "
        "them when run again); None: wait until they end.",
    )

    @model_validator(mode="after")
    def _complete(self) -> DispatchConfig:
        if self.engine == "aiida":
            missing = [k for k in ("computer", "code") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"engine 'aiida' needs {' and '.join(missing)}")
        elif self.profile or self.computer or self.code or self.options:
            raise ValueError("profile, computer, code and options are for engine 'aiida'; set engine: aiida")
        return self


class ReferenceConfig(Strict):
    """The reference method that labels structures."""

    adapter: str = Field("pyscf", description="Reference adapter: 'pyscf', 'tblite' or 'ase' (any ASE calculator).")
    settings: dict[str, Any] = Field(default_factory=dict, description="Adapter settings (level of theory).")
    workers: int = Field(1, ge=1, le=256, description="Calculations run at once (worker processes).")
    threads_per_worker: int | None = Field(
        None, ge=1, le=1024, description="Threads of each calculation; default: the cores divided among the workers."
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Wall-time limit of one calculation in s; past it the calculation is killed "
        "and recorded as 'timeout'. None: no limit.",
    )
    dispatch: DispatchConfig = Field(
        default_factory=DispatchConfig, description="Where the calculations run (local, or through AiiDA)."
    )
    max_failure_ratio: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Stop the campaign, with a report, once more than this share of its "
        "reference calculations failed, timed out or did not converge.",
    )

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, adapter: str) -> str:
        from ionflow.dft_adapters import ADAPTER_NAMES

        if adapter not in ADAPTER_NAMES:
            raise ValueError(f"unknown adapter {adapter!r}; known: {', '.join(ADAPTER_NAMES)}")
        return adapter

    @model_validator(mode="after")
    def _valid_settings(self) -> ReferenceConfig:
        from ionflow.dft_adapters import settings_model

        try:
            validated = settings_model(self.adapter).model_validate(self.settings)
        except ValidationError as exc:
            raise NestedErrors("settings", exc, f"the {self.adapter} adapter") from None
        self.settings = validated.model_dump(mode="json")
        return self


class ModelConfig(Strict):
    """The model: MACE backbone, electrostatic head and uncertainty (kept small: it is retrained each iteration)."""

    uncertainty: Literal["committee", "shallow"] = Field(
        "committee",
        description="committee: ensemble_size independently trained models; shallow: one backbone with "
        "ensemble_size readout heads trained with a Gaussian negative log-likelihood (about a third of the cost).",
    )
    ensemble_size: int = Field(
        3, ge=2, le=32, description="Members of the committee, or readout heads of the shallow ensemble."
    )
    r_max: float = Field(4.0, gt=0.5, le=12.0, description="Cutoff radius in Å.")
    num_interactions: int = Field(2, ge=1, le=4, description="Message-passing layers.")
    hidden_irreps: str = Field("16x0e+16x1o", description="e3nn irreps of the hidden node features.")
    mlp_irreps: str = Field("16x0e", description="Irreps of the non-linear readout.")
    max_ell: int = Field(2, ge=1, le=3, description="Highest spherical harmonic of the edge attributes.")
    correlation: int = Field(2, ge=1, le=3, description="Body order of the product basis minus one.")
    num_bessel: int = Field(8, ge=2, le=16, description="Radial Bessel functions.")
    num_polynomial_cutoff: int = Field(5, ge=2, le=10, description="Order of the smooth cutoff envelope.")
    dtype: Literal["float32", "float64"] = Field("float64", description="Floating point precision.")
    electrostatics: Literal["none", "latent", "equilibrated", "polarisable", "qeq"] = Field(
        "equilibrated",
        description="Long-range head: none (local only), latent (uniform charge shift), equilibrated "
        "(Fukui equilibration per spin channel), polarisable (charges see their potential) or qeq (charge "
        "equilibration: learned electronegativity and hardness, charges from one linear solve over the whole "
        "structure, so they respond to atoms beyond the cutoff; periodic cells up to 1000 atoms).",
    )
    charge_width: float = Field(1.0, gt=0.1, le=5.0, description="Width σ (Å) of each atom's Gaussian charge.")
    polarisation_steps: int = Field(2, ge=1, le=3, description="Fixed polarisation updates (polarisable only).")

    #: Fields that say where the backbone's weights start, not what the architecture is (absent from
    #: ModelSettings; the train step and ``ionflow train`` read them).
    CAMPAIGN_ONLY: ClassVar[tuple[str, ...]] = ("foundation", "foundation_sha256")

    foundation: Path | None = Field(
        None,
        description="A mace-torch model file (MACE-MP-0, MACE-OFF, or one from mace_run_train; relative to the "
        "campaign file) whose architecture and weights become the backbone: ionflow adds its electrostatic head and "
        "fine-tunes. Its cutoff, layers and element table replace r_max, num_interactions, hidden_irreps, mlp_irreps, "
        "max_ell, correlation, num_bessel and num_polynomial_cutoff. Such a file is a Python pickle: reading it runs "
        "code named in it, so it is read only because you name it here; pin it with foundation_sha256.",
    )
    foundation_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="The foundation file's expected sha256: a file that differs is refused before it is unpickled.",
    )

    @field_validator("hidden_irreps", "mlp_irreps")
    @classmethod
    def _irreps(cls, value: str) -> str:
        from ionflow.platform.model.mace_blocks import o3  # e3nn, imported after mace

        try:
            o3.Irreps(value)
        except Exception as exc:
            raise ValueError(f"not valid e3nn irreps: {value!r} ({exc})") from None
        return value

    def settings(self) -> ModelSettings:
        """These fields as the platform reads them (and a model file stores them)."""
        return ModelSettings(**self.model_dump(exclude=set(self.CAMPAIGN_ONLY)))

    def hyper(self) -> dict[str, Any]:
        """:meth:`settings` as the plain dict a model file keeps (``ModelSpec.hyper``)."""
        return dataclasses.asdict(self.settings())


class TrainingConfig(Strict):
    """Fitting the ensemble (committee or shallow) to the labels."""

    epochs: int = Field(300, ge=1, le=100_000, description="Epochs for the first model (from scratch).")
    finetune_epochs: int = Field(120, ge=1, le=100_000, description="Epochs when a model is refined from its parent.")
    learning_rate: float = Field(
        2e-2, gt=0, le=1.0, description="Adam learning rate of a model trained from scratch (per step, dimensionless)."
    )
    batch_size: int = Field(32, ge=1, le=10_000, description="Structures per optimiser step.")
    energy_weight: float = Field(
        1.0, ge=0, le=1e6, description="Weight of the squared per-atom energy error, (eV/atom)^-2."
    )
    forces_weight: float = Field(
        1.0, ge=0, le=1e6, description="Weight of the squared force error per component, (eV/Å)^-2."
    )
    charges_weight: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="Weight (e^-2) of the squared atomic charge error over atoms with REF_charges. Off by default: "
        "atomic charges are a partition (Mulliken, Löwdin, Hirshfeld, ...) that differs between schemes "
        "and codes, unlike energies, forces and dipoles; fitting one ties the model to that scheme.",
    )
    dipole_weight: float = Field(
        10.0,
        ge=0,
        le=1e6,
        description="Weight ((e·Å)^-2) of the squared dipole error per Cartesian component over finite structures with "
        "REF_dipole. Ignored with electrostatics: none, whose model predicts no charges.",
    )
    valid_fraction: float = Field(0.2, ge=0.0, lt=0.9, description="Share of labels kept out for validation.")
    finetune_lr_factor: float = Field(
        0.5,
        gt=0,
        le=1.0,
        description="Learning rate of a refinement from the parent = learning_rate x this (dimensionless).",
    )
    nll_weight: float = Field(
        1.0,
        ge=0,
        le=1e3,
        description="Weight of the shallow ensemble's Gaussian negative log-likelihood of the labels "
        "(dimensionless; it shapes the heads' spread). Ignored by committees.",
    )
    batch_atoms: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Atoms per optimiser step instead of batch_size structures: batches packed to about this many "
        "atoms, so that steps on large cells and on small molecules cost the same (a structure above it alone).",
    )

    frozen_layers: int = Field(
        0,
        ge=0,
        le=8,
        description="With model.foundation: the backbone's embeddings and its first frozen_layers message-passing "
        "layers (interaction and product blocks) keep the foundation's weights; its readouts and the later layers "
        "train. At most the foundation's number of layers.",
    )
    foundation_lr_factor: float = Field(
        0.1,
        gt=0,
        le=1.0,
        description="With model.foundation: the backbone's learning rate = the heads' learning rate x this "
        "(dimensionless), so that a few labels adjust rather than overwrite what the foundation learned.",
    )
    replay_file: Path | None = Field(
        None,
        description="With model.foundation: a sample of the foundation's own training data (any ASE-readable file "
        "with energies and forces at the foundation's level of theory, relative to the campaign file), replayed "
        "through the backbone's own readout while fine-tuning so that it does not forget.",
    )
    replay_frames: int = Field(
        64, ge=1, le=1_000_000, description="Replay frames drawn afresh each epoch (at most the file's)."
    )
    replay_weight: float = Field(
        0.1, ge=0, le=1e3, description="Weight of the replay loss relative to the campaign's (dimensionless)."
    )

    mixed_precision: bool = Field(
        False,
        description="Train a float64 model with its MACE backbone in float32 (tensor products, messages and "
        "readouts), and run the campaign's MD the same way; the energy sum, E0, charges, Coulomb term and forces "
        "stay float64, and the model file stays float64. On any device; the gain is largest on GPUs.",
    )

    parallel: Literal["auto", "data", "members"] = Field(
        "auto",
        description="Under torchrun with N processes (one per GPU): data splits every batch over the processes "
        "and sums the gradients (any model); members gives each process whole batches and its own committee "
        "members (member k on process k mod N; a committee of at least N members); auto: members for such a "
        "committee, else data. Both give the model one process trains, to rounding.",
    )

    #: Fields the campaign's train step reads, not the platform (absent from TrainingSettings).
    CAMPAIGN_ONLY: ClassVar[tuple[str, ...]] = ("from_scratch", "replay_file")

    from_scratch: bool = Field(
        False,
        description="Campaigns: train every model version from fresh weights (epochs, learning_rate) instead of "
        "refining the previous version (finetune_epochs, learning_rate x finetune_lr_factor). Refinement is cheaper; "
        "on the quickstart (2026-12-01) it left each version's force error on held-out MD frames 1.5-1.7x above a model "
        "retrained from scratch on the same labels.",
    )

    @model_validator(mode="after")
    def _some_loss(self) -> TrainingConfig:
        if self.energy_weight == 0 and self.forces_weight == 0:
            raise ValueError("energy_weight and forces_weight cannot both be 0")
        return self

    def settings(self) -> TrainingSettings:
        """These fields as the platform reads them."""
        return TrainingSettings(**self.model_dump(exclude=set(self.CAMPAIGN_ONLY)))


class BootstrapConfig(Strict):
    """The first labels: random displacements of the starting structure."""

    n_train: int = Field(8, ge=2, le=MAX_COUNT, description="Rattled structures labelled to train the first model.")
    n_test: int = Field(
        6,
        ge=0,
        le=MAX_COUNT,
        description="Rattled structures labelled once as part of the test set (0: none; see the test section "
        "for test sets drawn from MD or given as a file).",
    )
    rattle_stdev: float = Field(0.04, gt=0, le=0.5, description="Standard deviation of the displacements, Å.")
    source: Literal["rattle", "foundation_md"] = Field(
        "rattle",
        description="Where the n_train first training structures come from: rattle (random displacements of the "
        "start) or foundation_md (zero-shot: Langevin MD with model.foundation alone, the electrostatic head off, "
        "explore.walkers walkers at explore.temperature_K, frames spread evenly over md_steps; the test "
        "structures stay rattles).",
    )
    md_steps: int = Field(
        400, ge=1, le=MAX_COUNT, description="foundation_md: MD steps per walker (explore.timestep_fs each)."
    )


class TestSetConfig(Strict):
    """What the campaign's errors are measured on: structures labelled and never trained on."""

    held_out_per_iteration: int = Field(
        0,
        ge=0,
        le=MAX_COUNT,
        description="Explored frames held out for the test set in every iteration: drawn uniformly (from the "
        "seed) among the frames the iteration's MD sampled, before selection, labelled and never trained on. "
        "The test set grows with the campaign and represents the configurations the model meets in MD at the "
        "campaign's temperatures; every model is re-evaluated on it as it grows.",
    )
    file: Path | None = Field(
        None,
        description="Test structures from any ASE-readable file (relative to the campaign file). Frames with "
        "reference energies and forces (REF_energy/REF_forces, or plain energy/forces) are used as given and "
        "must be at the campaign's level of theory; frames without are labelled by the campaign's reference "
        "in iteration 0. Charge and multiplicity from each frame's info, else the system's.",
    )


class ChargeState(Strict):
    """A total charge and spin multiplicity of the system's atoms."""

    charge: int = Field(ge=-MAX_CHARGE, le=MAX_CHARGE, description="Total charge in e.")
    multiplicity: int = Field(1, ge=1, le=2 * MAX_CHARGE, description="Spin multiplicity 2S+1.")


class ExploreConfig(Strict):
    """Langevin MD walkers driven by the committee mean."""

    walkers: int = Field(4, ge=1, le=256, description="Independent MD walkers per iteration.")
    start_rattle_stdev: float = Field(
        0.03,
        gt=0,
        le=0.5,
        description="Standard deviation (Å) of the random displacements of a walker's fresh start from the "
        "starting structure (first iteration, or after the walker was stopped).",
    )
    steps: int = Field(200, ge=1, le=MAX_COUNT, description="MD steps per walker per iteration.")
    timestep_fs: float = Field(0.5, gt=0, le=5.0, description="Time step in fs.")
    temperature_K: float = Field(350.0, gt=0, le=MAX_TEMPERATURE_K, description="Thermostat temperature in K.")
    friction_per_fs: float = Field(
        0.02, gt=0, le=10.0, description="Langevin friction in 1/fs (0.001-0.1 is usual; 10 is overdamped)."
    )
    sample_every: int = Field(
        10, ge=1, le=MAX_COUNT, description="Keep one frame as a candidate every this many steps."
    )
    stop_uncertainty: float = Field(
        1.0,
        gt=0,
        le=MAX_FORCE_SPREAD,
        description="Stop a walker when its largest per-atom force spread exceeds this (eV/Å).",
    )
    growth: float = Field(
        1.0,
        ge=1.0,
        le=10.0,
        description="After an iteration whose walkers all ran to the end (no uncertainty stop), the next "
        "iteration's walkers run this many times longer (dimensionless; 1: always explore.steps).",
    )
    max_steps: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Longest walker (MD steps) that growth may reach; None: no limit."
    )
    add_temperatures_K: list[Annotated[float, Field(gt=0, le=MAX_TEMPERATURE_K)]] = Field(
        [],
        description="Temperatures (K) the exploration grows into, one step at a time: after an iteration whose "
        "walkers all ran to the end (no uncertainty stop), the next iteration's walkers also explore the next "
        "temperature of this list (and the next charge state of add_charge_states, see there); walkers are "
        "spread round-robin over the conditions unlocked so far.",
    )
    add_charge_states: list[ChargeState] = Field(
        [],
        description="Charge states (charge in e, multiplicity) of the same atoms the exploration grows into, "
        "as add_temperatures_K: condition (i-th temperature, j-th charge state) is unlocked at growth level "
        "i + j, the system's own charge state and explore.temperature_K being the 0th.",
    )
    temperature_ramp: float = Field(
        1.0,
        ge=1.0,
        le=10.0,
        description="Multiply the temperature by this factor each iteration (explore further); dimensionless.",
    )

    @model_validator(mode="after")
    def _sampling(self) -> ExploreConfig:
        if self.sample_every > self.steps:
            raise ValueError(f"sample_every ({self.sample_every}) is larger than steps ({self.steps})")
        if self.max_steps is not None and self.max_steps < self.steps:
            raise ValueError(f"max_steps ({self.max_steps}) is below steps ({self.steps})")
        return self


class SelectionConfig(Strict):
    """Which explored frames are worth a reference calculation."""

    strategy: Literal["uncertainty", "random", "diverse"] = Field(
        "uncertainty",
        description="uncertainty: the most uncertain frames in the trust window [threshold, ceiling), "
        "near-duplicates (min_distance) skipped; random: frames drawn uniformly (from the seed) among all explored "
        "frames not yet labelled, the spread unused: the baseline; diverse: frames in the trust window taken "
        "greedily by force spread x novelty of their atomic environments (the model's own invariant features, "
        "per element) against the labelled frames and those already taken.",
    )
    per_iteration: int = Field(
        6, ge=1, le=MAX_COUNT, description="At most this many frames are labelled per iteration."
    )
    threshold: float = Field(
        0.05,
        gt=0,
        le=MAX_FORCE_SPREAD,
        description="Frames whose largest per-atom force spread (eV/Å) is below this are trusted.",
    )
    ceiling: float = Field(
        2.0,
        gt=0,
        le=MAX_FORCE_SPREAD,
        description="Frames above this force spread (eV/Å) are treated as unphysical and skipped.",
    )
    min_distance: float = Field(
        0.02,
        ge=0,
        le=100.0,
        description="Frames closer than this descriptor distance (Å) to a chosen one are duplicates.",
    )
    min_novelty: float = Field(
        0.1,
        ge=0,
        le=100.0,
        description="diverse only: a frame is covered (not labelled) when its most novel atomic environment lies "
        "at most this far from a labelled or already chosen one of the same element; dimensionless, in units of "
        "the element's typical distance between labelled environments (median distance to the nearest one in "
        "another frame), so 1 means as far as labelled frames are from each other.",
    )

    @model_validator(mode="after")
    def _window(self) -> SelectionConfig:
        if self.ceiling <= self.threshold:
            raise ValueError(f"ceiling ({self.ceiling}) must be above threshold ({self.threshold})")
        return self


class ExecutionConfig(Strict):
    """Where the label step's calculations and the train step's processes run. Not part of the
    science: changing it never changes a result (beyond rounding), so a campaign may resume under
    another execution setting."""

    task_runner: Literal["local", "dask"] = Field(
        "local",
        description="local: reference.workers worker processes next to the flow; dask: chunks of the "
        "calculations as Prefect tasks on a Dask cluster (prefect-dask).",
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler of a running Dask cluster (e.g. one of dask-jobqueue's SLURMCluster); "
        "None: a LocalCluster started for each label step.",
    )
    dask_workers: int = Field(2, ge=1, le=1024, description="Workers of the LocalCluster, and chunks per label step.")
    train_processes: int | Literal["auto"] = Field(
        "auto",
        description="Processes of the train step, on the machine that runs it (the gpu pool's worker, with a gpu "
        "pool): each on a GPU of its own where there are enough (gloo on the CPU otherwise), splitting each "
        "batch or the committee's members as training.parallel says; the model is the one a single process trains, "
        "to rounding. auto: one per visible CUDA GPU (one without a GPU, or with IONFLOW_DEVICE set).",
    )

    @field_validator("train_processes", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> int | str:
        if value == "auto":
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64:
            return value
        raise ValueError(f"{value!r}: 'auto' or a whole number of processes from 1 to 64")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CampaignConfig(Strict):
    """One active-learning campaign."""

    name: str = Field(description="Campaign name; also the name of its folder.")
    workdir: Path = Field(Path("runs"), description="Folder that holds campaign folders (relative to the cwd).")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the provenance database (e.g. postgresql+psycopg://user@host/db); default: "
        "the environment's IONFLOW_DATABASE_URL, else SQLite in the campaign folder. Keep passwords out of the "
        "file: put them in IONFLOW_DATABASE_URL or PostgreSQL's own PGPASSWORD / ~/.pgpass.",
    )
    iterations: int = Field(3, ge=1, le=1000, description="Explore-select-label-train iterations after bootstrap.")
    max_labels: int | None = Field(None, ge=1, le=MAX_COUNT, description="Stop once this many reference labels exist.")
    fit_for_md_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="Stop once every walker of an iteration ran at least this many MD steps (explore.timestep_fs "
        "each, at that iteration's temperature) without an uncertainty stop: the model is fit for the MD it is "
        "trained for. Set explore.growth above 1 so that walkers grow towards this length.",
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="Seed of every random choice (rattles, MD, initial weights); below 2**32."
    )
    system: SystemConfig
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    explore: ExploreConfig = Field(default_factory=ExploreConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    test: TestSetConfig = Field(default_factory=TestSetConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @model_validator(mode="after")
    def _conditions(self) -> CampaignConfig:
        numbers = self.system.atoms().numbers
        for k, state in enumerate(self.explore.add_charge_states):
            problem = charge_state_problem(numbers, state.charge, state.multiplicity)
            if problem:
                raise ValueError(f"explore.add_charge_states.{k}: {problem}")
            if (state.charge, state.multiplicity) == (self.system.charge, self.system.multiplicity):
                raise ValueError(f"explore.add_charge_states.{k}: the system's own charge state is explored already")
        n_conditions = (1 + len(self.explore.add_temperatures_K)) * (1 + len(self.explore.add_charge_states))
        if self.explore.walkers < n_conditions:
            raise ValueError(
                f"explore.walkers ({self.explore.walkers}) is below the number of exploration conditions, "
                f"{n_conditions} (temperatures x charge states): some would never be explored"
            )
        return self

    @model_validator(mode="after")
    def _foundation(self) -> CampaignConfig:
        problem = foundation_options_problem(self.model, self.training, self.bootstrap)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _one_dispatch(self) -> CampaignConfig:
        if self.reference.dispatch.engine == "aiida" and self.execution.task_runner == "dask":
            raise ValueError(
                "reference.dispatch.engine 'aiida' and execution.task_runner 'dask' both say where calculations "
                "run; choose one"
            )
        return self

    @model_validator(mode="after")
    def _test_set(self) -> CampaignConfig:
        test = self.test
        if self.bootstrap.n_test == 0 and test.held_out_per_iteration == 0 and test.file is None:
            raise ValueError(
                "the campaign has no test set: set bootstrap.n_test, test.held_out_per_iteration or test.file"
            )
        if test.file is not None:
            self.test_structures()  # raises naming the file and frame
        return self

    def test_structures(self) -> tuple[list[Atoms], bool]:
        """The frames of ``test.file`` (none without one) and whether they carry their own labels."""
        if self.test.file is None:
            return [], False
        from ionflow.platform.dataset import read_test_structures

        try:
            return read_test_structures(
                self.test.file,
                self.system.charge,
                self.system.multiplicity,
                set(self.system.atoms().get_chemical_symbols()),
            )
        except ValueError as exc:
            raise ValueError(f"test.file: {exc}") from None

    @field_validator("database_url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        from sqlalchemy.engine import make_url

        problem = database_url_problem(url)
        if problem:
            raise ValueError(problem)
        if make_url(url).password:
            raise ValueError(
                f"the URL holds a password; put it in the environment ({DATABASE_URL_VARIABLE}, PGPASSWORD or "
                "~/.pgpass) instead of the campaign file"
            )
        return url

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("use letters, digits, '_', '-' and '.', starting with a letter or digit (max 64)")
        return name

    @property
    def campaign_dir(self) -> Path:
        return (self.workdir / self.name).resolve()

    @property
    def db_url(self) -> str:
        """The provenance database: the file's ``database_url``, else ``IONFLOW_DATABASE_URL``, else
        SQLite in the campaign folder (:attr:`default_database`)."""
        return (
            self.database_url
            or os.environ.get(DATABASE_URL_VARIABLE)
            or f"sqlite:///{self.campaign_dir / 'ionflow.db'}"
        )

    @property
    def default_database(self) -> bool:
        """Whether the campaign uses the SQLite file in its own folder (no URL given anywhere)."""
        return not (self.database_url or os.environ.get(DATABASE_URL_VARIABLE))

    def science_hash(self) -> str:
        """Hash of everything that changes what the campaign computes (not where it writes)."""
        data = self.model_dump(
            mode="json",
            exclude={
                "workdir": True,
                "database_url": True,
                "iterations": True,
                "max_labels": True,
                "fit_for_md_steps": True,
                "execution": True,
                "reference": {"workers", "threads_per_worker", "timeout_s", "max_failure_ratio", "dispatch"},
            },
        )
        for section, key in _SETTINGS_ADDED_LATER:
            if data[section][key] == type(getattr(self, section)).model_fields[key].default:
                del data[section][key]
        for section in _SECTIONS_ADDED_LATER:
            if not data[section]:  # every key at its default: as if the section did not exist
                del data[section]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


#: Settings that once were fixed numbers in the code, whose default is that number: left out of the
#: science hash at their default, so campaigns started before they existed still resume.
_SETTINGS_ADDED_LATER = (
    ("explore", "start_rattle_stdev"),
    ("training", "finetune_lr_factor"),
    ("training", "nll_weight"),
    ("selection", "strategy"),
    ("selection", "min_novelty"),
    ("explore", "growth"),
    ("explore", "max_steps"),
    ("training", "from_scratch"),
    ("explore", "add_temperatures_K"),
    ("explore", "add_charge_states"),
    ("test", "held_out_per_iteration"),
    ("test", "file"),
    ("training", "batch_atoms"),
    ("model", "foundation"),
    ("model", "foundation_sha256"),
    ("training", "frozen_layers"),
    ("training", "foundation_lr_factor"),
    ("training", "replay_file"),
    ("training", "replay_frames"),
    ("training", "replay_weight"),
    ("bootstrap", "source"),
    ("bootstrap", "md_steps"),
    ("training", "mixed_precision"),
    ("training", "parallel"),
)

#: Sections whose every key is in :data:`_SETTINGS_ADDED_LATER`: left out whole at their defaults.
_SECTIONS_ADDED_LATER = ("test",)


def foundation_options_problem(
    model: ModelConfig, training: TrainingConfig, bootstrap: BootstrapConfig | None = None
) -> str | None:
    """What is wrong with the foundation options of ``model``, ``training`` and ``bootstrap`` (files
    that are not there, options that need a foundation without one), or None. Reads no file's contents."""
    if model.foundation is None:
        if bootstrap is not None and bootstrap.source == "foundation_md":
            return "bootstrap.source foundation_md needs model.foundation (the model that runs the MD)"
        if training.frozen_layers:
            return "training.frozen_layers needs model.foundation (a model of ionflow's own has nothing to keep)"
        if training.replay_file is not None:
            return "training.replay_file needs model.foundation (replay is of the foundation's own data)"
        if model.foundation_sha256 is not None:
            return "model.foundation_sha256 pins model.foundation, which is not set"
        return None
    if not model.foundation.is_file():
        return f"model.foundation: no such file {model.foundation}"
    if training.replay_file is not None and not training.replay_file.is_file():
        return f"training.replay_file: no such file {training.replay_file}"
    return None


class TrainFile(Strict):
    """A model file for ``ionflow train``: the ``model:`` and ``training:`` sections of a campaign."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @model_validator(mode="after")
    def _foundation(self) -> TrainFile:
        problem = foundation_options_problem(self.model, self.training)
        if problem:
            raise ValueError(problem)
        return self


class ConfigError(ValueError):
    """A campaign file that cannot be used; the message names the file and the field."""


class NestedErrors(ValueError):
    """The errors of a mapping validated by hand inside a section (an adapter's ``settings``),
    kept whole so that :func:`describe_errors` names each by its full dotted path."""

    def __init__(self, key: str, errors: ValidationError, owner: str) -> None:
        super().__init__(f"{key}: {describe_errors(errors)}")
        self.key, self.errors, self.owner = key, errors, owner


def _flat_errors(exc: ValidationError, prefix: tuple = (), owner: str = "this section") -> list[tuple[str, str]]:
    """(dotted path, message) of every error, nested settings expanded."""
    out = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, NestedErrors):
            out += _flat_errors(inner.errors, (*loc, inner.key), inner.owner)
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (not a setting of {owner})"
        shown = [p for i, p in enumerate(loc) if not (p in _STRUCTURE_TAGS and i and loc[i - 1] == "structure")]
        out.append((".".join(map(str, shown)), msg))
    return out


def describe_errors(exc: ValidationError, limit: int = 5) -> str:
    """The first ``limit`` errors of ``exc`` as ``dotted.field.path: message``, joined by ``; ``."""
    return "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in _flat_errors(exc)[:limit])


def database_url_problem(url: str) -> str | None:
    """Say why SQLAlchemy could not open the database ``url`` from this Python environment (not a
    URL, an unknown dialect, a driver that is not installed or is asyncio-only, a backend ionflow's
    schema is not written for), or None. Never prints the URL, which may hold a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = "e.g. postgresql+psycopg://user@host:5432/db or sqlite:///path/ionflow.db"
    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"not a database URL ({example})"
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        return f"SQLAlchemy knows no database dialect {parsed.drivername!r} ({example})"
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        return (
            f"the driver of {parsed.drivername!r} is not installed (no module {exc.name or str(exc)!r}); "
            f"install it or use another driver ({example})"
        )
    if getattr(dialect, "is_async", False):
        return f"{parsed.drivername!r} is an asyncio driver; ionflow needs a synchronous one ({example})"
    if parsed.get_backend_name() not in DATABASE_BACKENDS:
        return f"ionflow's provenance database is {' or '.join(DATABASE_BACKENDS)}, not {parsed.get_backend_name()}"
    return None


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Paths in the file are relative to the file: ``system.structure``, ``test.file``, ``model.foundation``
    and ``training.replay_file``."""
    for section, key in (
        ("system", "structure"),
        ("test", "file"),
        ("model", "foundation"),
        ("training", "replay_file"),
    ):
        values = raw.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            path = Path(values[key]).expanduser()
            values[key] = str(path if path.is_absolute() else base / path)
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> CampaignConfig:
    """Read and validate a campaign file; raise :class:`ConfigError` naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such campaign file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # not YAML, or not text at all
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    raw.update(overrides or {})
    raw = _resolve_paths(raw, path.parent.resolve())
    try:
        cfg = CampaignConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc)}") from None
    environment_url = os.environ.get(DATABASE_URL_VARIABLE)
    if cfg.database_url is None and environment_url and (problem := database_url_problem(environment_url)):
        raise ConfigError(f"{path}: database_url: none in the file, and {DATABASE_URL_VARIABLE}: {problem}")
    return cfg


def load_train_config(
    path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None
) -> tuple[ModelConfig, TrainingConfig]:
    """Read and validate the ``model:``/``training:`` YAML of ``ionflow train`` (defaults without a file).

    ``overrides`` (``{"model": {...}, "training": {...}}``, e.g. from command-line options) replace
    the file's values before validation. Raises :class:`ConfigError` naming the file and field.
    """
    name = str(path) if path is not None else "options"
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such model config file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:  # not YAML, or not text at all
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with 'model:' and 'training:' sections")
        raw = _resolve_paths(raw, path.parent.resolve())
    for section, values in (overrides or {}).items():
        if values:
            current = raw.get(section)
            raw[section] = {**(current if isinstance(current, dict) else {}), **values}
    try:
        cfg = TrainFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{name}: {describe_errors(exc)}") from None
    return cfg.model, cfg.training
