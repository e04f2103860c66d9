"""Small real systems shared by the test folders (``from tests.structures import hydronium``).

Positions in Å; each structure carries its charge (e) and multiplicity (2S+1) in ``info``.
Every call returns a fresh object, so a test may change it freely.
"""

from __future__ import annotations

from ase import Atoms
from ase.build import molecule

from ionflow.platform.structures import with_charge_state

#: The Zundel cation H5O2+ (charge +1, singlet) near its GFN2-xTB minimum, as a campaign file
#: writes an inline structure (``system.structure``).
ZUNDEL = {
    "symbols": ["O", "O", "H", "H", "H", "H", "H"],
    "positions": [
        [0.0, 0.0746, 1.2269],
        [0.0, -0.0746, -1.2269],
        [0.0, 0.0, 0.0],
        [0.7888, 0.5146, 1.5803],
        [-0.7888, 0.5146, 1.5803],
        [0.7888, -0.5146, -1.5803],
        [-0.7888, -0.5146, -1.5803],
    ],
}


def hydronium() -> Atoms:
    """H3O+ (charge +1, singlet), slightly distorted so that no force vanishes by symmetry."""
    atoms = Atoms(
        "OH3",
        positions=[[0.0, 0.0, 0.12], [0.0, 0.94, -0.16], [0.81, -0.47, -0.16], [-0.83, -0.46, -0.15]],
    )
    return with_charge_state(atoms, 1, 1)


def water(charge: int = 0, multiplicity: int = 1) -> Atoms:
    """H2O at ASE's geometry, with the given charge state (which need not be consistent)."""
    return with_charge_state(molecule("H2O"), charge, multiplicity)


def hydroxyl(charge: int, multiplicity: int) -> Atoms:
    """OH (0.98 Å bond) with the given charge state: the radical (0, 2) or hydroxide (-1, 1)."""
    return with_charge_state(Atoms("OH", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.98]]), charge, multiplicity)
