"""One ASE calculation, run as a child process by :class:`~ionflow.dft_adapters.ase_adapter.ASEAdapter`.

``python -m ionflow.dft_adapters.ase_run FOLDER`` reads ``FOLDER/job.json`` (calculator,
parameters, command, properties) and ``FOLDER/structure.extxyz``, runs the calculator with
``FOLDER`` as its directory, and writes either ``FOLDER/results.npz`` (eV, Å, as ASE gives
them) and exits 0, or ``FOLDER/error.json`` (the exception's type and message) and exits 2.
A crash or a kill leaves neither file; the parent reads that as a failure.

Running each calculation in its own process is what makes a timeout enforceable (the
parent kills the whole process group) and keeps a crashing code from taking the campaign
down with it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np


def calculator_class(spec: str) -> type:
    """The calculator class named by ``spec``: an ASE name (``cp2k``), ``module:Class`` or ``file.py:Class``."""
    if ":" not in spec:
        from ase.calculators.calculator import get_calculator_class

        return get_calculator_class(spec)
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load calculator file {where}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ImportError(f"{where} has no calculator class {name!r}") from None


def _save(path: Path, arrays: dict[str, Any]) -> None:
    """Write the npz under a temporary name first: a half-written file is never read as results."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def run(folder: Path) -> None:
    from ase.io import read

    job = json.loads((folder / "job.json").read_text())
    atoms = read(folder / "structure.extxyz", format="extxyz")
    cls = calculator_class(job["calculator"])
    kwargs = dict(job["parameters"])
    if job.get("command"):
        kwargs["command"] = job["command"]
    calc = cls(directory=str(folder), **kwargs)
    atoms.calc = calc
    try:
        arrays: dict[str, Any] = {
            "energy": np.asarray(atoms.get_potential_energy(), dtype=float),
            "forces": np.asarray(atoms.get_forces(), dtype=float),
        }
        implemented = set(getattr(calc, "implemented_properties", ()))
        # stress needs a 3D-periodic cell; a dipole is defined for finite systems only
        if "stress" in job["properties"] and "stress" in implemented and atoms.pbc.all():
            arrays["stress"] = np.asarray(atoms.get_stress(voigt=True), dtype=float)
        if "dipole" in job["properties"] and "dipole" in implemented and not atoms.pbc.any():
            arrays["dipole"] = np.asarray(atoms.get_dipole_moment(), dtype=float)
        if "charges" in job["properties"] and "charges" in implemented:
            arrays["charges"] = np.asarray(atoms.get_charges(), dtype=float)
    finally:
        close = getattr(calc, "close", None)
        if callable(close):
            close()
    _save(folder / "results.npz", arrays)


#: What this child reports of its own cost, next to its results (read by the parent).
USAGE_FILE = "usage.json"


def _write_usage(folder: Path) -> None:
    """CPU seconds of this process and the code's processes it waited for (user + system)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    (folder / USAGE_FILE).write_text(json.dumps({"cpu_time_s": cpu}))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ionflow.dft_adapters.ase_run FOLDER", file=sys.stderr)
        return 64
    folder = Path(argv[0]).resolve()
    try:
        try:
            run(folder)
        finally:
            _write_usage(folder)
    except Exception as exc:  # noqa: BLE001  every failure is reported to the parent as a file
        from ase.calculators.calculator import SCFError

        traceback.print_exc()
        (folder / "error.json").write_text(
            json.dumps(
                {
                    "type": type(exc).__name__,
                    "message": str(exc)[-2000:],
                    "scf": isinstance(exc, SCFError),
                }
            )
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
