"""PySCF reference adapter: Kohn-Sham DFT on isolated molecules.

Units in: positions Å (``Atoms``), charge e and multiplicity 2S+1 from ``atoms.info``.
Units out (``LabelResult``): energy eV, forces eV/Å, dipole e·Å, charges e.

Dipole origin: PySCF's ``dip_moment`` (electrons + nuclei) is taken about the origin
(0, 0, 0) of the structure's own Cartesian frame; nothing is recentred. For a neutral
molecule the dipole does not depend on the origin; for a charged one it shifts by
``charge * shift``, so compare dipoles of ions only in the same frame.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyscf
from ase import Atoms
from ase.units import Bohr, Hartree
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pyscf import dft, gto, lib
from pyscf.data.elements import ELEMENTS
from pyscf.lib.exceptions import BasisNotFoundError

from ionflow.dft_adapters.base import (
    InProcessAdapter,
    LabelResult,
    SettingError,
    check_charge_states,
)
from ionflow.platform.structures import charge_of, multiplicity_of

#: Settings that change how a calculation runs, not what it computes: left out of the hash.
RUNTIME_ONLY = frozenset({"num_threads", "verbose"})

#: The retry after a failed SCF: virtual orbitals shifted up by this much (Ha) ...
RETRY_LEVEL_SHIFT = 0.3
#: ... the Fock matrix mixed with the previous one for the first few cycles ...
RETRY_DAMP = 0.5
RETRY_DAMPED_CYCLES = 8
#: ... and at most this many times ``max_cycle`` iterations, so that a small ``max_cycle``
#: keeps the whole calculation short (the retry is bounded by the user's setting).
RETRY_CYCLE_FACTOR = 2
#: ... and, that failing too, the same again from a superposition of atomic densities.
RETRY_GUESS = "atom"


class PySCFSettings(BaseModel):
    """Level of theory and SCF controls of a PySCF calculation."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    xc: str = Field("pbe", description="Exchange-correlation functional as libxc names it ('pbe', 'b3lyp').")
    basis: str = Field("def2-svp", description="Basis set name known to pyscf.gto.basis ('def2-svp').")
    density_fit: bool = Field(True, description="Density fitting (RI) of the Coulomb/exchange integrals.")
    conv_tol: float = Field(
        1e-8,
        ge=1e-14,
        le=1e-3,
        description="SCF energy convergence threshold in Hartree (1e-14, near double precision, to 1e-3).",
    )
    max_cycle: int = Field(100, ge=1, le=10_000, description="Maximum SCF iterations; a retry gets twice as many.")
    grid_level: int = Field(3, ge=0, le=9, description="PySCF DFT integration grid level (0 coarse, 9 fine).")
    charge_scheme: Literal["mulliken", "meta_lowdin"] = Field(
        "meta_lowdin", description="Atomic charge partitioning: Mulliken or meta-Löwdin populations."
    )
    num_threads: int | None = Field(
        None, ge=1, le=1024, description="OpenMP threads for this calculation; None leaves PySCF's setting as is."
    )
    verbose: int = Field(0, ge=0, le=9, description="PySCF log level (0 silent).")

    @field_validator("xc")
    @classmethod
    def _known_functional(cls, xc: str) -> str:
        if not xc.strip(" ,"):
            raise ValueError("no exchange-correlation functional given (PySCF would take it as none at all)")
        try:
            dft.libxc.parse_xc(xc)
        except (KeyError, ValueError, IndexError) as exc:  # PySCF's parser raises each, depending on the typo
            raise ValueError(f"unknown exchange-correlation functional {xc!r}: {exc}") from None
        return xc

    @field_validator("basis")
    @classmethod
    def _known_basis(cls, basis: str) -> str:
        # Which elements matter is known only with the structures (PySCFAdapter.check); a name
        # PySCF has for no element at all is a typo whatever the system.
        if not any(_has_basis(basis, symbol) for symbol in ELEMENTS[1:]):
            raise ValueError(f"basis set {basis!r} is unknown to PySCF (for every element)")
        return basis


def _has_basis(basis: str, symbol: str) -> bool:
    """Whether PySCF can build basis ``basis`` for element ``symbol``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PySCF suggests installing basis-set-exchange
            return bool(gto.basis.load(basis, symbol))
    except (BasisNotFoundError, KeyError):  # KeyError: an element absent from the basis file
        return False


def basis_problem(basis: str, symbols: set[str]) -> str | None:
    """Say which elements the basis set does not cover, or None when it covers them all."""
    missing = [symbol for symbol in sorted(symbols) if not _has_basis(basis, symbol)]
    if missing:
        return f"basis set {basis!r} has no functions for {', '.join(missing)} in PySCF"
    return None


class PySCFAdapter(InProcessAdapter):
    """Labels molecules with PySCF Kohn-Sham DFT (RKS for singlets, UKS otherwise)."""

    name = "pyscf"
    settings_model = PySCFSettings
    runtime_only = RUNTIME_ONLY

    @property
    def code_version(self) -> str:
        return pyscf.__version__

    def check(self, structures: list[Atoms]) -> None:
        """Refuse periodic structures, impossible charge states and elements the basis set does
        not cover (:class:`SettingError` naming ``basis``) before computing anything."""
        periodic = [i for i, atoms in enumerate(structures) if np.any(atoms.pbc)]
        if periodic:
            raise ValueError(
                f"structures {periodic} are periodic: the PySCF adapter handles molecules only; "
                "use the tblite adapter, or CP2K through the ase adapter, for periodic systems"
            )
        check_charge_states(structures)
        symbols = {symbol for atoms in structures for symbol in atoms.get_chemical_symbols()}
        problem = basis_problem(self.settings.basis, symbols)
        if problem:
            raise SettingError("basis", problem)

    def label(self, structures: list[Atoms], run_dirs: Sequence[Path] | None = None) -> list[LabelResult]:
        """Energy, forces, dipole and atomic charges of each molecule.

        With ``run_dirs`` (one folder per structure) each calculation keeps its input
        structure, PySCF's log (``pyscf.log``) and a ``result.json`` there.
        Raises ``ValueError`` before computing anything when a structure is periodic, its
        charge/multiplicity is inconsistent or the basis set lacks one of its elements; any other
        problem becomes that structure's status.
        """
        with lib.with_omp_threads(self.settings.num_threads):  # None: leave as is
            return super().label(structures, run_dirs)

    def _compute(self, atoms: Atoms, run_dir: Path | None = None) -> dict[str, Any]:
        s = self.settings
        mol = gto.Mole()
        if run_dir is not None:
            # The log is opened here rather than through ``output=``, with which Mole.build
            # prints "output file: ..." to the console, between the campaign's progress bars.
            mol.stdout = open(run_dir / "pyscf.log", "w", encoding="utf-8")  # noqa: SIM115  closed below
        try:
            # Positions go in as Bohr with ASE's constant, so that every unit conversion here
            # (in and out) uses ase.units and forces are the exact derivative in ASE's Å.
            mol.build(
                atom=list(zip(atoms.get_chemical_symbols(), map(tuple, atoms.positions / Bohr))),
                unit="Bohr",
                basis=s.basis,
                charge=charge_of(atoms),
                spin=multiplicity_of(atoms) - 1,
                verbose=max(s.verbose, 4) if run_dir is not None else s.verbose,
            )
            return self._scf(mol, atoms)
        finally:
            if run_dir is not None:
                mol.stdout.close()

    def _scf(self, mol: gto.Mole, atoms: Atoms) -> dict[str, Any]:
        s = self.settings
        multiplicity = multiplicity_of(atoms)
        mf = (dft.RKS if multiplicity == 1 else dft.UKS)(mol, xc=s.xc)
        if s.density_fit:
            mf = mf.density_fit()
        mf.grids.level = s.grid_level
        mf.conv_tol = s.conv_tol
        mf.max_cycle = s.max_cycle
        mf.kernel()
        attempts = ["plain"]
        if not mf.converged:
            # Restart from the last density with a level shift and early damping; the
            # converged energy does not depend on either.
            mf.level_shift = RETRY_LEVEL_SHIFT
            mf.damp = RETRY_DAMP
            mf.diis_start_cycle = RETRY_DAMPED_CYCLES
            mf.max_cycle = RETRY_CYCLE_FACTOR * s.max_cycle
            mf.kernel(dm0=mf.make_rdm1())
            attempts.append("level shift + damping from the last density")
        if not mf.converged:
            # A different starting point: superposition of atomic densities instead of MINAO.
            mf.init_guess = RETRY_GUESS
            mf.kernel()
            attempts.append(f"level shift + damping from the {RETRY_GUESS!r} initial guess")
        if not mf.converged:
            return {
                "status": "unconverged",
                "error": (
                    f"SCF not converged in {s.max_cycle} cycles, nor in {mf.max_cycle} more with level "
                    f"shift {RETRY_LEVEL_SHIFT} Ha and damping {RETRY_DAMP} from the last density or from "
                    f"the {RETRY_GUESS!r} initial guess (conv_tol {s.conv_tol} Ha)"
                ),
                "extra": {"scf_attempts": attempts},
            }

        gradient = mf.nuc_grad_method().kernel()  # (n_atoms, 3) Ha/Bohr
        dipole = mf.dip_moment(unit="AU", verbose=0)  # e·Bohr about the frame's origin
        if s.charge_scheme == "mulliken":
            _, charges = mf.mulliken_pop(verbose=0)
        else:
            _, charges = mf.mulliken_meta(verbose=0)
        return {
            "status": "ok",
            "energy": float(mf.e_tot) * Hartree,
            "forces": -np.asarray(gradient) * Hartree / Bohr,
            "dipole": np.asarray(dipole) * Bohr,
            "charges": np.asarray(charges, dtype=float),
            "charge_scheme": s.charge_scheme,
            "extra": {
                "scf": "RKS" if multiplicity == 1 else "UKS",
                "scf_retry": len(attempts) > 1,
                "scf_attempts": attempts,
                "dipole_origin_A": [0.0, 0.0, 0.0],
            },
        }
