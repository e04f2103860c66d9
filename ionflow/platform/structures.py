"""Structures: reading, writing, content hashing and sanity checks.

A structure is an :class:`ase.Atoms` whose ``info`` carries the total charge
(``info["charge"]``, in e) and the spin multiplicity (``info["multiplicity"]``,
2S+1). Positions are in Å. Every other part of ionflow reads charge and
multiplicity through :func:`charge_of` and :func:`multiplicity_of` so that the
defaults (0 and 1) live in one place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, chemical_symbols, covalent_radii
from ase.io import read, write

#: Positions are rounded to this many decimals (Å) before hashing, so that the
#: same geometry written and read back through text files keeps its id.
HASH_DECIMALS = 6

REF_PREFIX = "REF_"


def charge_of(atoms: Atoms) -> int:
    """Total charge in e (``atoms.info["charge"]``, default 0)."""
    return int(atoms.info.get("charge", 0))


def multiplicity_of(atoms: Atoms) -> int:
    """Spin multiplicity 2S+1 (``atoms.info["multiplicity"]``, default 1)."""
    return int(atoms.info.get("multiplicity", 1))


def with_charge_state(atoms: Atoms, charge: int, multiplicity: int) -> Atoms:
    """Return a copy of ``atoms`` carrying ``charge`` and ``multiplicity`` in ``info``."""
    out = atoms.copy()
    out.calc = None
    out.info["charge"] = int(charge)
    out.info["multiplicity"] = int(multiplicity)
    return out


def structure_hash(atoms: Atoms) -> str:
    """Content id of a structure: sha256 over numbers, positions, cell, pbc, charge, multiplicity.

    dtypes and byte order are normalised (int64 / float64 little-endian, positions
    rounded to ``HASH_DECIMALS`` Å) so that ids match across machines and file formats.
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(atoms.numbers, dtype="<i8").tobytes())
    pos = np.round(np.asarray(atoms.positions, dtype=np.float64), HASH_DECIMALS) + 0.0
    h.update(np.ascontiguousarray(pos, dtype="<f8").tobytes())
    cell = np.round(np.asarray(atoms.cell.array, dtype=np.float64), HASH_DECIMALS) + 0.0
    h.update(np.ascontiguousarray(cell, dtype="<f8").tobytes())
    h.update(np.asarray(atoms.pbc, dtype=np.uint8).tobytes())
    h.update(np.asarray([charge_of(atoms), multiplicity_of(atoms)], dtype="<i8").tobytes())
    return h.hexdigest()


def electron_count(numbers: Iterable[int], charge: int) -> int:
    """Number of electrons of a structure with atomic ``numbers`` and total ``charge``."""
    return int(sum(int(z) for z in numbers)) - int(charge)


def charge_state_problem(numbers: Sequence[int], charge: int, multiplicity: int) -> str | None:
    """Say what is wrong with a charge/multiplicity pair, or return None when it is consistent.

    The number of unpaired electrons (multiplicity - 1) must have the parity of the
    electron count and cannot exceed it.
    """
    if multiplicity < 1:
        return f"multiplicity must be >= 1 (got {multiplicity})"
    n_el = electron_count(numbers, charge)
    if n_el < 0:
        return f"charge {charge} leaves {n_el} electrons"
    unpaired = multiplicity - 1
    if unpaired > n_el:
        return f"multiplicity {multiplicity} needs {unpaired} unpaired electrons but there are only {n_el}"
    if (n_el - unpaired) % 2:
        parity = "odd" if n_el % 2 else "even"
        hint = "an even multiplicity (2, 4, ...)" if n_el % 2 else "an odd multiplicity (1, 3, ...)"
        return (
            f"charge {charge} gives {n_el} electrons ({parity}), which cannot have multiplicity "
            f"{multiplicity}; use {hint} or change the charge"
        )
    return None


#: A cluster is placed in a box this much wider (Å) than its extent plus the cutoff, so that a
#: neighbour list of a non-periodic structure never sees an image.
_FREE_PADDING = 2.0


def neighbour_pairs(atoms: Atoms, cutoff: float, quantities: str = "ijS") -> tuple[np.ndarray, ...]:
    """matscipy's neighbour list of ``atoms`` within ``cutoff`` (Å), periodic along ``atoms.pbc`` only:
    every ordered pair and image (``quantities`` as matscipy's: i, j, S image shifts, d distances...)."""
    from matscipy.neighbours import neighbour_list

    pbc = np.asarray(atoms.pbc, dtype=bool)
    positions = atoms.positions
    cell = atoms.cell.array.copy()
    if not pbc.all():
        # matscipy wants a cell; give non-periodic directions one wide enough for no images.
        extent = positions.max(axis=0) - positions.min(axis=0) + 2 * cutoff + _FREE_PADDING
        for axis in range(3):
            if not pbc[axis]:
                cell[axis] = 0.0
                cell[axis, axis] = extent[axis]
        positions = positions - positions.min(axis=0) * (~pbc)
    return neighbour_list(quantities, pbc=pbc, cell=cell, positions=positions, cutoff=cutoff)


#: Up to this many atoms the closest contact comes from all pair distances; above, from neighbour
#: lists within the radii below (Å), which cost O(n) time and memory instead of O(n²) (ASE's
#: minimum-image distances: 0.78 s for 1017 periodic atoms, n² x 3 floats of memory). MD walkers take
#: their contacts from their own neighbour list instead (``md._WalkersCalculator``).
_DENSE_CONTACT_ATOMS = 32
_CONTACT_RADII = (3.0, 6.0)


def closest_contact(atoms: Atoms) -> tuple[float, int, int]:
    """Shortest interatomic distance (Å, minimum image for periodic cells) and its pair (i < j);
    an atom's distance to its own periodic images does not count."""
    n = len(atoms)
    if n < 2:
        return float("inf"), -1, -1
    if n > _DENSE_CONTACT_ATOMS:
        for radius in _CONTACT_RADII:
            i, j, d = neighbour_pairs(atoms, radius, "ijd")
            other = i != j
            if other.any():
                k = int(np.argmin(np.where(other, d, np.inf)))
                return float(d[k]), int(min(i[k], j[k])), int(max(i[k], j[k]))
    d = atoms.get_all_distances(mic=bool(np.any(atoms.pbc)))
    d[np.diag_indices(n)] = np.inf
    i, j = np.unravel_index(np.argmin(d), d.shape)
    return float(d[i, j]), int(i), int(j)


def overlap_problem(atoms: Atoms, factor: float = 0.5) -> str | None:
    """Say which two atoms overlap (closer than ``factor`` x the sum of covalent radii)."""
    dmin, i, j = closest_contact(atoms)
    if i < 0:
        return None
    zi, zj = atoms.numbers[i], atoms.numbers[j]
    limit = factor * (covalent_radii[zi] + covalent_radii[zj])
    if dmin < limit:
        return (
            f"atoms {i} ({chemical_symbols[zi]}) and {j} ({chemical_symbols[zj]}) are "
            f"{dmin:.3f} Å apart, closer than {limit:.3f} Å: they overlap"
        )
    return None


def read_structures(path: str | Path, index: str = ":") -> list[Atoms]:
    """Read every frame of any ASE-readable file; charge/multiplicity stay in ``info``."""
    frames = read(str(path), index=index)
    return list(frames) if isinstance(frames, list) else [frames]


def labelled_copy(atoms: Atoms, energy: float, forces: np.ndarray, **extra: np.ndarray | float | None) -> Atoms:
    """Copy of ``atoms`` with reference labels stored as ``REF_*`` keys (extxyz round-trips them).

    ``extra`` may hold ``dipole`` (3,), ``charges`` (n,), ``stress`` (6,); ``None`` values are skipped.
    """
    out = atoms.copy()
    out.calc = None
    out.info[REF_PREFIX + "energy"] = float(energy)
    out.arrays[REF_PREFIX + "forces"] = np.asarray(forces, dtype=float).reshape(len(atoms), 3)
    for key, value in extra.items():
        if value is None:
            continue
        value = np.asarray(value, dtype=float)
        if value.ndim == 1 and value.shape[0] == len(atoms) and key == "charges":
            out.arrays[REF_PREFIX + key] = value
        else:
            out.info[REF_PREFIX + key] = value
    return out


#: Results of an attached ASE calculator (e.g. the ``SinglePointCalculator`` that ASE's extxyz
#: reader builds from plain ``energy``/``forces`` keys) that :func:`with_reference_labels` keeps.
CALCULATOR_LABELS = ("energy", "forces", "dipole", "charges", "stress")


def with_reference_labels(atoms: Atoms) -> Atoms:
    """Copy of ``atoms`` whose labels are ``REF_*`` keys, also when they came from a calculator.

    ASE reads plain ``energy``/``forces``/``dipole``/``charges``/``stress`` of an extxyz file
    into a ``SinglePointCalculator``, not into ``info``/``arrays``; those results become
    ``REF_energy`` (eV), ``REF_forces`` (eV/Å), ``REF_dipole`` (e·Å, about the frame's origin),
    ``REF_charges`` (e) and ``REF_stress``. ``REF_*`` keys already present win. The copy has no
    calculator.
    """
    out = atoms.copy()
    out.calc = None
    results = dict(getattr(atoms.calc, "results", None) or {})
    for key in CALCULATOR_LABELS:
        value = results.get(key)
        ref = REF_PREFIX + key
        if value is None or ref in out.info or ref in out.arrays:
            continue
        value = np.asarray(value, dtype=float)
        if key in ("forces", "charges"):
            out.arrays[ref] = value.reshape(len(atoms), *value.shape[1:])
        elif key == "energy":
            out.info[ref] = float(value)
        else:
            out.info[ref] = value
    return out


def centre_of_mass(atoms: Atoms) -> np.ndarray:
    """Centre of mass (3,) in Å with the standard masses of ``ase.data.atomic_masses``.

    The model uses the same table (custom ``atoms.set_masses`` values are ignored by both),
    so reference and predicted dipoles refer to the same point.
    """
    masses = atomic_masses[np.asarray(atoms.numbers, dtype=int)]
    return masses @ np.asarray(atoms.positions, dtype=float) / masses.sum()


def dipole_about_centre_of_mass(atoms: Atoms, dipole: np.ndarray) -> np.ndarray:
    """Move a dipole (3,) e·Å taken about the frame's origin to the centre of mass.

    The reference adapters (PySCF, tblite) report dipoles about (0, 0, 0) of the structure's
    frame; the model predicts them about the centre of mass. With total charge Q,

        mu_com = mu_origin - Q * r_com ,

    which is translation invariant. For neutral structures nothing changes. This is the one
    place where the two conventions meet.
    """
    return np.asarray(dipole, dtype=float).reshape(3) - charge_of(atoms) * centre_of_mass(atoms)


def write_extxyz(path: str | Path, frames: Sequence[Atoms]) -> Path:
    """Write frames to an extxyz file atomically (a reader never sees half a file).

    Positions are written on the hash grid (rounded to ``HASH_DECIMALS`` Å): ASE prints
    them with 8 decimals, and a value within 5e-9 Å of a rounding boundary would
    otherwise read back with a different :func:`structure_hash`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    snapped = []
    for atoms in frames:
        frame = atoms.copy()
        frame.calc = atoms.calc  # ASE writes a calculator's results; keep them
        frame.positions = np.round(frame.positions, HASH_DECIMALS)
        snapped.append(frame)
    write(str(tmp), snapped, format="extxyz")
    tmp.replace(path)
    return path


def rattled(atoms: Atoms, n: int, stdev: float, seed: int) -> list[Atoms]:
    """``n`` copies of ``atoms`` with Gaussian displacements (``stdev`` in Å), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        frame = atoms.copy()
        frame.calc = None
        frame.positions = frame.positions + rng.normal(0.0, stdev, size=frame.positions.shape)
        frames.append(frame)
    return frames
