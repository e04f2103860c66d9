"""The reference-adapter protocol and the record every adapter returns."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import socket
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from ase import Atoms
from ase.io import write
from pydantic import BaseModel

from ionflow.platform.structures import charge_of, charge_state_problem, multiplicity_of

Status = Literal["ok", "failed", "unconverged", "timeout"]


class SettingError(ValueError):
    """A setting that cannot work for the structures at hand (a basis set without functions for
    one of their elements); ``setting`` is its key in the adapter's settings (``basis``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass
class LabelResult:
    """What one reference calculation gave.

    Units: energy eV, forces eV/Å (n_atoms, 3), stress eV/Å^3 (6,) Voigt with ASE's sign,
    dipole e·Å (3,), charges e (n_atoms,). Arrays are None when the code does not give them
    or the calculation did not finish (``status != "ok"``).
    """

    status: Status
    code: str
    code_version: str
    settings_hash: str
    wall_time_s: float
    energy: float | None = None
    cpu_time_s: float | None = None  # CPU seconds of the code (all its threads and processes), when known
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    dipole: np.ndarray | None = None
    charges: np.ndarray | None = None
    charge_scheme: str | None = None
    error: str | None = None
    host: str | None = None
    run_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def settings_hash(code: str, settings: dict[str, Any]) -> str:
    """sha256 of the code name and its level-of-theory settings (canonical JSON)."""
    blob = json.dumps({"code": code, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@runtime_checkable
class ReferenceAdapter(Protocol):
    """A reference calculator: labels structures with energy and forces.

    Charge and multiplicity are read from each structure's ``info`` (``charge``,
    ``multiplicity``); an adapter refuses a combination that does not match the
    electron count with ``ValueError`` before it computes anything.
    """

    name: str
    settings_hash: str
    #: True when each calculation already runs in its own child process (the adapter enforces
    #: its own timeout); False when it runs in the calling process.
    isolated: bool

    @property
    def code_version(self) -> str:
        """Version of the code that computes (the compiled library's or the program's)."""
        ...

    def check(self, structures: list[Atoms]) -> None:
        """Raise ``ValueError`` naming every structure this adapter cannot label, before any work."""
        ...

    def label(self, structures: list[Atoms], run_dirs: Sequence[Path] | None = None) -> list[LabelResult]:
        """Label each structure (keeping its files in ``run_dirs``, one folder each, when given);
        a failure becomes a result with its status, never an exception."""
        ...


class InProcessAdapter(ABC):
    """Shared machinery of adapters that compute in the calling process (PySCF, tblite).

    A subclass sets ``name``, ``code_version`` and ``_compute(atoms, run_dir) -> fields``;
    this class checks the batch up front, times each calculation, turns any exception into
    a ``failed`` result and keeps the run folder.
    """

    name: str
    settings_hash: str
    isolated = False
    #: The adapter's settings (a pydantic model) and those of its fields that change how it runs,
    #: never what it computes (threads, verbosity): they stay out of the settings hash.
    settings_model: type[BaseModel]
    runtime_only: frozenset[str] = frozenset()

    def __init__(self, settings: BaseModel | dict[str, Any] | None = None) -> None:
        if not isinstance(settings, self.settings_model):
            settings = self.settings_model(**(settings or {}))
        self.settings = settings
        self.settings_hash = settings_hash(self.name, settings.model_dump(exclude=set(self.runtime_only)))

    def check(self, structures: list[Atoms]) -> None:
        check_charge_states(structures)

    def label(self, structures: list[Atoms], run_dirs: Sequence[Path] | None = None) -> list[LabelResult]:
        self.check(structures)
        dirs = check_run_dirs(structures, run_dirs)
        return [self._label_one(atoms, run_dir) for atoms, run_dir in zip(structures, dirs)]

    def _label_one(self, atoms: Atoms, run_dir: Path | None) -> LabelResult:
        # Outside the try below: a _compute that cannot take these arguments (a stub with the
        # wrong signature) is a programming error to raise, never a failed calculation.
        inspect.signature(self._compute).bind(atoms, run_dir)
        start, cpu_start = time.perf_counter(), time.process_time()
        if run_dir is not None:
            start_run_dir(run_dir, atoms)
        try:
            fields = self._compute(atoms, run_dir)
        except Exception as exc:  # noqa: BLE001  any failure of the code becomes the result's status
            fields = {"status": self._status_of(exc), "error": error_line(exc)}
        # the process's CPU time, all threads: a labelling worker computes one structure at a time
        fields.setdefault("cpu_time_s", time.process_time() - cpu_start)
        result = self.result(wall_time_s=time.perf_counter() - start, run_dir=run_dir, **fields)
        if run_dir is not None:
            finish_run_dir(run_dir, result)
        return result

    def _status_of(self, exc: Exception) -> Status:
        """The status of a calculation that raised ``exc`` (``failed`` unless a subclass knows better)."""
        return "failed"

    @abstractmethod
    def _compute(self, atoms: Atoms, run_dir: Path | None) -> dict[str, Any]:
        """One calculation: the fields of its :class:`LabelResult` (status and results, or error)."""

    def result(self, wall_time_s: float, run_dir: Path | None, **fields: Any) -> LabelResult:
        """A :class:`LabelResult` stamped with this adapter's code, version, settings hash and host."""
        return make_result(self, wall_time_s, run_dir, **fields)


def make_result(adapter: Any, wall_time_s: float, run_dir: Path | None, **fields: Any) -> LabelResult:
    """A :class:`LabelResult` of ``adapter`` (code, version, settings hash, this host) with ``fields``."""
    return LabelResult(
        code=fields.pop("code", adapter.name),
        code_version=fields.pop("code_version", None) or adapter.code_version,
        settings_hash=adapter.settings_hash,
        wall_time_s=wall_time_s,
        host=socket.gethostname(),
        run_dir=str(run_dir) if run_dir is not None else None,
        **fields,
    )


#: Environment variables that bound the threads of OpenMP and the BLAS libraries.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def child_environment(threads: int | None) -> dict[str, str]:
    """The environment of a child Python process that labels: this one's, with ``threads`` in
    every thread-count variable (set before the child loads numpy or the code), and this very
    ionflow importable whatever the child's working directory."""
    env = dict(os.environ)
    if threads is not None:
        env.update({var: str(threads) for var in THREAD_VARIABLES})
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def check_charge_states(structures: list[Atoms]) -> None:
    """Raise ``ValueError`` listing every structure whose charge/multiplicity cannot exist.

    Called by adapters before they compute anything, so a batch never half-runs on bad input.
    """
    problems = [
        f"structure {i}: {problem}"
        for i, atoms in enumerate(structures)
        if (problem := charge_state_problem(atoms.numbers, charge_of(atoms), multiplicity_of(atoms)))
    ]
    if problems:
        raise ValueError("inconsistent charge/multiplicity: " + "; ".join(problems))


def error_line(exc: BaseException) -> str:
    """The last line of an exception's traceback (``Type: message``), for ``LabelResult.error``."""
    return traceback.format_exception_only(exc)[-1].strip()


def check_run_dirs(structures: list[Atoms], run_dirs: Sequence[Path] | None) -> list[Path | None]:
    """One run folder per structure, or None for each when no folders are asked for."""
    if run_dirs is None:
        return [None] * len(structures)
    if len(run_dirs) != len(structures):
        raise ValueError(f"{len(structures)} structures but {len(run_dirs)} run folders")
    return [Path(d) for d in run_dirs]


def start_run_dir(run_dir: Path, atoms: Atoms) -> None:
    """Create a calculation's folder and keep its input structure there (extxyz, with charge state)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    frame = atoms.copy()
    frame.calc = None
    write(str(run_dir / "structure.extxyz"), frame, format="extxyz")


def finish_run_dir(run_dir: Path, result: LabelResult) -> None:
    """Write what the calculation gave (status, energy in eV, error, wall time) as result.json."""
    record = {
        "status": result.status,
        "energy_eV": result.energy,
        "error": result.error,
        "wall_time_s": result.wall_time_s,
        "cpu_time_s": result.cpu_time_s,
        "code": result.code,
        "code_version": result.code_version,
        "settings_hash": result.settings_hash,
        "host": result.host,
        "extra": result.extra,
    }
    (run_dir / "result.json").write_text(json.dumps(record, indent=2, default=str))
