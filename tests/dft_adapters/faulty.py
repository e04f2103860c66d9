"""A file-based ASE calculator for fault injection: GFN2-xTB (tblite, for real) behind a
program that crashes, hangs, writes garbage or does not converge when told to.

``FaultyXTB(faults=[...], counter=PATH)``: the n-th run of the program (counted in the file
``counter``, across processes) does ``faults[n]`` when n < len(faults), else computes
normally. ``fault`` (one mode) applies to every run instead. Modes: ``crash`` (the program
aborts with SIGABRT), ``hang`` (sleeps for an hour), ``garbage`` (writes unreadable output),
``unconverged`` (tblite with 2 SCC iterations: it prints ``SCC NOT CONVERGED`` and exits 1),
``ok``.

The program is this file run as a script, so the calculator is an ordinary
``FileIOCalculator``: input file in, output file out, in its directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

INPUT, OUTPUT = "xtb-input.json", "xtb-output.txt"


def _next_run(counter: str) -> int:
    with open(counter, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        n = int(handle.read() or 0)
        handle.seek(0)
        handle.truncate()
        handle.write(str(n + 1))
        return n


def program() -> int:
    """The 'code': read the input, maybe misbehave, else run GFN2-xTB and write the output."""
    job = json.loads(Path(INPUT).read_text())
    mode = job["fault"]
    if mode is None:
        n = _next_run(job["counter"]) if job["counter"] else 0
        mode = job["faults"][n] if n < len(job["faults"]) else "ok"
    print(f"faulty xtb: mode {mode}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    if mode == "crash":
        os.abort()
    if mode == "hang":
        time.sleep(3600)
    if mode == "garbage":
        Path(OUTPUT).write_text("energy ####\nforces \x00\x01 not numbers\n")
        return 0
    from ase.units import Bohr, Hartree
    from tblite.interface import Calculator

    calc = Calculator(
        "GFN2-xTB",
        np.array(job["numbers"]),
        np.array(job["positions"]) / Bohr,
        charge=float(job["charge"]),
        uhf=job["multiplicity"] - 1,
    )
    calc.set("verbosity", 0)
    calc.set("max-iter", 2 if mode == "unconverged" else job["max_iterations"])
    try:
        res = calc.singlepoint()
    except RuntimeError as exc:
        print(f"SCC NOT CONVERGED: {exc}", flush=True)
        return 1
    forces = -np.asarray(res.get("gradient")) * Hartree / Bohr
    lines = [f"energy {float(res.get('energy')) * Hartree:.12f}"] + [
        " ".join(f"{f:.12f}" for f in row) for row in forces
    ]
    Path(OUTPUT).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(program())


from ase.calculators.calculator import FileIOCalculator


class FaultyXTB(FileIOCalculator):
    """GFN2-xTB through a program that fails on request (see the module docstring)."""

    implemented_properties = ["energy", "forces"]
    default_parameters = {
        "faults": [],
        "counter": None,
        "fault": None,
        "charge": 0,
        "multiplicity": 1,
        "max_iterations": 250,
    }

    def __init__(self, **kwargs):
        command = f"{sys.executable} {Path(__file__).resolve()}"
        super().__init__(command=command, **kwargs)

    def write_input(self, atoms, properties=None, system_changes=None):
        super().write_input(atoms, properties, system_changes)
        p = self.parameters
        job = {
            "numbers": atoms.numbers.tolist(),
            "positions": atoms.positions.tolist(),
            "charge": p["charge"],
            "multiplicity": p["multiplicity"],
            "faults": list(p["faults"]),
            "counter": p["counter"],
            "fault": p["fault"],
            "max_iterations": p["max_iterations"],
        }
        Path(self.directory, INPUT).write_text(json.dumps(job))

    def read_results(self):
        lines = Path(self.directory, OUTPUT).read_text().splitlines()
        key, value = lines[0].split()
        if key != "energy":
            raise ValueError(f"unexpected first line {lines[0]!r}")
        self.results["energy"] = float(value)
        self.results["forces"] = np.array([[float(x) for x in line.split()] for line in lines[1:]])
