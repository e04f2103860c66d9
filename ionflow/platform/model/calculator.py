"""ASE calculator over an ensemble (committee or shallow): mean energy and forces, plus their spreads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from ionflow.platform.model.ensemble import Ensemble
from ionflow.platform.model.files import load_model
from ionflow.platform.model.graph import build_batch


class EnsembleCalculator(Calculator):
    """Energy (eV), forces (eV/Å), stress (eV/Å^3, Voigt, periodic only) of the ensemble mean.

    Also ``charges`` (n_atoms,) e and, for finite systems, ``dipole`` (3,) e·Å about the
    centre of mass. Extra results: ``energy_uncertainty`` (eV, the members' or heads' standard
    deviation) and ``forces_uncertainty`` (n_atoms,) eV/Å, per-atom spread of their forces, both
    multiplied by the model's calibration factors (predicted errors).
    Total charge and multiplicity are read from ``atoms.info``.
    """

    implemented_properties = [
        "energy",
        "free_energy",
        "forces",
        "stress",
        "charges",
        "dipole",
        "energy_uncertainty",
        "forces_uncertainty",
    ]

    def __init__(self, ensemble: Ensemble, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ensemble = ensemble

    @property
    def committee(self) -> Ensemble:
        """Deprecated name of :attr:`ensemble` (it holds either kind), kept for users' scripts."""
        return self.ensemble

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        periodic = bool(np.all(self.atoms.pbc))
        batch = build_batch(
            [self.atoms],
            self.ensemble.z_table,
            self.ensemble.r_max,
            dtype=self.ensemble.spec.dtype,
            device=self.ensemble.device,
        )
        pred = {k: v.cpu() for k, v in self.ensemble.predict(batch, compute_stress=periodic).items()}
        energy = float(pred["energy"][0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": pred["forces"].numpy().astype(float),
            "energy_uncertainty": float(pred["energy_std"][0]),
            "forces_uncertainty": pred["force_std"].numpy().astype(float),
            "charges": pred["charges"].numpy().astype(float),
        }
        if not periodic:
            self.results["dipole"] = pred["dipole"][0].numpy().astype(float)
        if periodic:
            s = pred["stress"][0].numpy()
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


# Deprecated: the calculator serves both kinds of ensemble. Kept because users' scripts import it.
CommitteeCalculator = EnsembleCalculator


def load_calculator(path: str | Path) -> EnsembleCalculator:
    """An ASE calculator for the model file at ``path``."""
    return EnsembleCalculator(load_model(path))
