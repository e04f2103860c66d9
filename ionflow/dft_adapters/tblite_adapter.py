"""tblite reference adapter: GFN-xTB tight binding for molecules and periodic cells.

Units in: positions and cell Å (``Atoms``), charge e and multiplicity 2S+1 from ``atoms.info``.
Units out (``LabelResult``): energy eV, forces eV/Å, stress eV/Å^3 (Voigt xx yy zz yz xz xy,
ASE's sign, 3D-periodic cells only), dipole e·Å (molecules only), charges e (tblite's
Mulliken charges).

Dipole origin: as in the PySCF adapter, the dipole is taken about (0, 0, 0) of the
structure's own Cartesian frame, so for an ion it moves by ``charge * shift`` with the molecule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.units import Bohr, Hartree, kB
from pydantic import BaseModel, ConfigDict, Field
from tblite import library
from tblite.interface import Calculator

from ionflow.dft_adapters.base import InProcessAdapter
from ionflow.platform.structures import charge_of, multiplicity_of

#: Settings that change how a calculation runs, not what it computes: left out of the hash.
RUNTIME_ONLY = frozenset({"verbosity"})

#: tblite's ASE calculator states its charges are Mulliken charges of the xTB minimal basis.
CHARGE_SCHEME = "tblite-mulliken"

#: (3, 3) row-major virial -> Voigt order xx, yy, zz, yz, xz, xy.
VOIGT = [0, 4, 8, 5, 2, 1]


class TBLiteSettings(BaseModel):
    """Hamiltonian and SCC controls of a tblite calculation."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # The parametrisations tblite.interface.Calculator builds (its ASE calculator passes the name on).
    method: Literal["GFN2-xTB", "GFN1-xTB", "IPEA1-xTB"] = Field("GFN2-xTB", description="xTB Hamiltonian.")
    accuracy: float = Field(
        1.0, ge=1e-4, le=1e3, description="tblite accuracy factor, 1e-4 to 1e3 as in xtb; smaller is tighter."
    )
    max_iterations: int = Field(250, ge=1, le=10_000, description="Maximum self-consistent charge iterations.")
    electronic_temperature: float = Field(300.0, ge=0, le=10_000.0, description="Fermi smearing temperature in K.")
    verbosity: int = Field(0, ge=0, le=9, description="tblite printout level (0 silent).")


class TBLiteAdapter(InProcessAdapter):
    """Labels molecules and periodic cells with tblite's GFN-xTB."""

    name = "tblite"
    settings_model = TBLiteSettings
    runtime_only = RUNTIME_ONLY

    @property
    def code_version(self) -> str:
        return ".".join(map(str, library.get_version()))  # the compiled library's

    def _status_of(self, exc: Exception) -> str:
        # TBLiteRuntimeError (a RuntimeError) is also what a failed SCC raises
        return "unconverged" if isinstance(exc, RuntimeError) and "not converged" in str(exc) else "failed"

    def _compute(self, atoms: Atoms, run_dir: Path | None = None) -> dict[str, Any]:
        s = self.settings
        periodic = bool(np.any(atoms.pbc))
        calc = Calculator(
            s.method,
            atoms.numbers,
            atoms.positions / Bohr,
            charge=float(charge_of(atoms)),
            uhf=multiplicity_of(atoms) - 1,
            lattice=atoms.cell.array / Bohr if periodic else None,
            periodic=np.asarray(atoms.pbc, dtype=bool) if periodic else None,
        )
        calc.set("accuracy", s.accuracy)
        calc.set("max-iter", s.max_iterations)
        calc.set("temperature", s.electronic_temperature * kB / Hartree)  # tblite wants Ha
        calc.set("verbosity", s.verbosity)
        res = calc.singlepoint()

        fields: dict[str, Any] = {
            "status": "ok",
            "energy": float(res.get("energy")) * Hartree,
            "forces": -np.asarray(res.get("gradient")) * Hartree / Bohr,
            "charges": np.asarray(res.get("charges"), dtype=float),
            "charge_scheme": CHARGE_SCHEME,
        }
        if not periodic:
            # The dipole of a periodic cell depends on how atoms are wrapped: only molecules get one.
            fields["dipole"] = np.asarray(res.get("dipole")) * Bohr  # e·Bohr -> e·Å, origin (0, 0, 0)
        elif atoms.pbc.all():
            # tblite's "virial" is the strain derivative dE/d(eps) (checked against a finite
            # strain), so ASE's stress (1/V) dE/d(eps) is +virial/V; a volume needs 3D periodicity.
            stress = np.asarray(res.get("virial")) * Hartree / atoms.get_volume()
            fields["stress"] = stress.flat[VOIGT]
        return fields
