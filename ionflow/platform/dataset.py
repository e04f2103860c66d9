"""Training data: reference labels, the checks a dataset must pass, E0, batches, and the split.

Labels are read from ``REF_energy`` (eV, ``info``) and ``REF_forces`` (eV/Å,
``arrays``), the keys ionflow writes in its extxyz datasets, and where present
``REF_charges`` (e per atom, ``arrays``) and ``REF_dipole`` (e·Å, ``info``, about the
frame's origin as the adapters write it; moved to the centre of mass here).

The one train/validation split rule (campaigns and ``ionflow train`` alike): a structure is held
out when its bucket, the first 32 bits of sha256(structure hash) read as a number in [0, 1), is
below the validation fraction. A structure's side depends only on its own hash, so it never moves
as the data grows; the one exception keeps both sides non-empty (:func:`validation_flags`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from ionflow.platform.model.ensemble import ModelSpec
from ionflow.platform.model.graph import build_batch
from ionflow.platform.structures import (
    REF_PREFIX,
    charge_of,
    charge_state_problem,
    dipole_about_centre_of_mass,
    multiplicity_of,
    overlap_problem,
    read_structures,
    structure_hash,
    with_reference_labels,
)

#: Hex digits of sha256(structure hash) that make a structure's bucket (32 bits: 4e9 buckets).
_BUCKET_DIGITS = 8

#: With this many labels or more, a split that holds none out moves one across (see validation_flags).
_MIN_FOR_VALIDATION = 4


def reference_energy(atoms: Atoms) -> float:
    return float(atoms.info[REF_PREFIX + "energy"])


def reference_forces(atoms: Atoms) -> np.ndarray:
    return np.asarray(atoms.arrays[REF_PREFIX + "forces"], dtype=float)


def reference_charges(atoms: Atoms) -> np.ndarray | None:
    """Reference atomic charges (n,) in e, or None when the frame has none."""
    value = atoms.arrays.get(REF_PREFIX + "charges")
    return None if value is None else np.asarray(value, dtype=float).reshape(len(atoms))


def reference_dipole(atoms: Atoms) -> np.ndarray | None:
    """Reference dipole (3,) in e·Å about the centre of mass (the model's convention).

    None for frames without ``REF_dipole`` and for periodic frames, whose dipole is not defined.
    """
    value = atoms.info.get(REF_PREFIX + "dipole")
    if value is None or np.any(atoms.pbc):
        return None
    return dipole_about_centre_of_mass(atoms, value)


def fit_atomic_energies(frames: Sequence[Atoms], z_table: Sequence[int]) -> np.ndarray:
    """Per-element reference energies E0 (eV) from a least-squares fit E ~ sum_z n_z E0_z.

    With one composition the system is underdetermined; lstsq then gives the
    minimum-norm solution, which still reproduces the mean energy exactly.
    """
    counts = np.array([[np.sum(a.numbers == z) for z in z_table] for a in frames], dtype=float)
    energies = np.array([reference_energy(a) for a in frames])
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return e0


def label_batches(
    frames: Sequence[Atoms],
    spec: ModelSpec,
    batch_size: int,
    device: torch.device | str = "cpu",
    groups: Sequence[Sequence[int]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Graphs with their labels, ``batch_size`` frames each, or one per group of frame indexes
    (``groups``, e.g. :func:`~ionflow.platform.batching.pack_by_atoms`). Built once: positions do
    not change during training.

    Besides the graph, each batch holds ``ref_energy`` (g,), ``ref_forces`` (n, 3), ``n_atoms`` (g,),
    ``ref_charges`` (n,) with ``charges_mask`` (n,), and ``ref_dipole`` (g, 3, about the centre of
    mass) with ``dipole_mask`` (g,); masked-out entries hold zeros.
    """
    if groups is None:
        groups = [range(start, min(start + batch_size, len(frames))) for start in range(0, len(frames), batch_size)]
    out = []
    for group in groups:
        chunk = [frames[i] for i in group]
        batch = build_batch(chunk, spec.z_table, float(spec.settings.r_max), dtype=spec.dtype)
        batch["ref_energy"] = torch.tensor([reference_energy(a) for a in chunk], dtype=spec.dtype)
        batch["ref_forces"] = torch.tensor(np.concatenate([reference_forces(a) for a in chunk]), dtype=spec.dtype)
        batch["n_atoms"] = torch.tensor([len(a) for a in chunk], dtype=spec.dtype)
        charges = [reference_charges(a) for a in chunk]
        dipoles = [reference_dipole(a) for a in chunk]
        batch["ref_charges"] = torch.tensor(
            np.concatenate([np.zeros(len(a)) if q is None else q for a, q in zip(chunk, charges)]), dtype=spec.dtype
        )
        batch["charges_mask"] = torch.tensor(
            np.concatenate([np.full(len(a), q is not None) for a, q in zip(chunk, charges)])
        )
        batch["ref_dipole"] = torch.tensor(
            np.stack([np.zeros(3) if mu is None else mu for mu in dipoles]), dtype=spec.dtype
        )
        batch["dipole_mask"] = torch.tensor([mu is not None for mu in dipoles])
        out.append({key: value.to(device) for key, value in batch.items()})
    return out


def check_one_level_of_theory(frames: Sequence[Atoms]) -> None:
    """Refuse a training set that mixes levels of theory or holds labels that are not ``ok``.

    Frames labelled by ionflow carry ``info["settings_hash"]`` (the adapter's level of theory)
    and, from ``ionflow label``, ``info["label_status"]``; frames without them (labels made
    elsewhere) are taken as they are. Raises ``ValueError`` naming the frames.
    """
    bad = [i for i, a in enumerate(frames) if a.info.get("label_status", "ok") != "ok"]
    if bad:
        raise ValueError(f"frames {bad[:10]} have labels that did not end ok (label_status); they cannot be trained on")
    by_hash: dict[str, list[int]] = {}
    for i, a in enumerate(frames):
        if "settings_hash" in a.info:
            by_hash.setdefault(str(a.info["settings_hash"]), []).append(i)
    if len(by_hash) > 1:
        groups = "; ".join(f"{h[:12]}: frames {idx[:5]}{'...' if len(idx) > 5 else ''}" for h, idx in by_hash.items())
        raise ValueError(
            f"the labels come from {len(by_hash)} different levels of theory (settings_hash {groups}); "
            "train on labels of one level of theory"
        )


def dataset_problem(frames: Sequence[Atoms]) -> str | None:
    """Say what makes ``frames`` unusable for training, naming the first bad frame (0-based), or None.

    Every frame needs ``REF_energy`` and ``REF_forces`` (n, 3) (see
    :func:`ionflow.platform.structures.with_reference_labels` for plain ASE labels), an integer
    charge and multiplicity consistent with its electron count, and ``REF_charges``/``REF_dipole``
    of the right shapes where present; all from one level of theory (:func:`check_one_level_of_theory`).
    """
    if not frames:
        return "no frames"
    try:
        check_one_level_of_theory(frames)
    except ValueError as exc:
        return str(exc)
    for k, atoms in enumerate(frames):
        where = f"frame {k} ({atoms.get_chemical_formula()})"
        if len(atoms) == 0:
            return f"{where} has no atoms"
        missing = [
            key for key, store in (("energy", atoms.info), ("forces", atoms.arrays)) if REF_PREFIX + key not in store
        ]
        if missing:
            return f"{where} has no {' or '.join(REF_PREFIX + m for m in missing)} label (nor a calculator's {'/'.join(missing)})"
        if not np.isfinite(reference_energy(atoms)):
            return f"{where}: {REF_PREFIX}energy is not finite"
        forces = np.asarray(atoms.arrays[REF_PREFIX + "forces"], dtype=float)
        if forces.shape != (len(atoms), 3) or not np.all(np.isfinite(forces)):
            return f"{where}: {REF_PREFIX}forces must be finite with shape ({len(atoms)}, 3), got {forces.shape}"
        for key in ("charge", "multiplicity"):
            value = atoms.info.get(key)
            if value is not None and (not np.isscalar(value) or float(value) != int(float(value))):
                return f"{where}: {key} must be an integer, got {value!r}"
        problem = charge_state_problem(atoms.numbers, charge_of(atoms), multiplicity_of(atoms))
        if problem:
            return f"{where}: charge/multiplicity: {problem}"
        charges = atoms.arrays.get(REF_PREFIX + "charges")
        if charges is not None and np.asarray(charges).size != len(atoms):
            return f"{where}: {REF_PREFIX}charges must have one value per atom"
        dipole = atoms.info.get(REF_PREFIX + "dipole")
        if dipole is not None and np.asarray(dipole).size != 3:
            return f"{where}: {REF_PREFIX}dipole must have 3 components"
    return None


def read_test_structures(
    path: str | Path, charge: int, multiplicity: int, elements: set[str]
) -> tuple[list[Atoms], bool]:
    """The structures of a test-set file and whether they carry labels (all of them, or none).

    Frames without ``charge``/``multiplicity`` in ``info`` get ``charge``/``multiplicity``.
    Raises ``ValueError`` naming the file's first unusable frame (0-based): an unreadable file,
    a mix of labelled and unlabelled frames, an element outside ``elements`` (the model could
    not predict it), an impossible charge state, overlapping atoms, or bad labels.
    """
    try:
        frames = [with_reference_labels(a) for a in read_structures(path)]
    except Exception as exc:  # ASE raises many types for unreadable files
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not frames:
        raise ValueError(f"{path} holds no structures")
    has_labels = [REF_PREFIX + "energy" in a.info and REF_PREFIX + "forces" in a.arrays for a in frames]
    if any(has_labels) and not all(has_labels):
        raise ValueError(
            f"{path}: frame {has_labels.index(True)} has reference energy and forces but frame "
            f"{has_labels.index(False)} has not; label every frame or none (unlabelled ones are labelled by the "
            "campaign's reference)"
        )
    for k, atoms in enumerate(frames):
        where = f"{path}: frame {k} ({atoms.get_chemical_formula()})"
        atoms.info.setdefault("charge", charge)
        atoms.info.setdefault("multiplicity", multiplicity)
        foreign = sorted(set(atoms.get_chemical_symbols()) - elements)
        if foreign:
            raise ValueError(
                f"{where} holds {', '.join(foreign)}, which the system's structure lacks: the model cannot predict it"
            )
        problem = overlap_problem(atoms)
        if problem:
            raise ValueError(f"{where}: {problem}")
        problem = charge_state_problem(atoms.numbers, charge_of(atoms), multiplicity_of(atoms))
        if problem:
            raise ValueError(f"{where}: charge/multiplicity: {problem}")
    problem = dataset_problem(frames) if all(has_labels) else None  # the labels themselves
    if problem:
        raise ValueError(f"{path}: {problem}")
    return frames, all(has_labels)


# --- the train/validation split -----------------------------------------------------------------


def is_validation(structure_hash_: str, fraction: float) -> bool:
    """Whether the structure with this hash is held out: its bucket in [0, 1) is below ``fraction``.

    Depends only on the hash, so a structure never moves between sets as the data grows.
    """
    bucket = int(hashlib.sha256(structure_hash_.encode()).hexdigest()[:_BUCKET_DIGITS], 16) / 16**_BUCKET_DIGITS
    return bucket < fraction


def validation_flags(hashes: Sequence[str], fraction: float) -> list[bool]:
    """Which of the structures with these hashes are held out (in order): :func:`is_validation`,
    except that both sides are kept non-empty. When every structure falls in validation, or when
    none does although ``fraction > 0`` and there are at least 4, the first one moves across; so
    the first structure alone may change side as the data grows."""
    flags = [is_validation(h, fraction) for h in hashes]
    if flags and (all(flags) or (len(flags) >= _MIN_FOR_VALIDATION and not any(flags) and fraction > 0)):
        flags[0] = not flags[0]
    return flags


def frame_hash(atoms: Atoms) -> str:
    """The frame's ``info["structure_hash"]`` (set by the campaign database) or else its structure hash."""
    if "structure_hash" in atoms.info:
        return str(atoms.info["structure_hash"])
    return structure_hash(atoms)


def split(frames: Sequence[Atoms], fraction: float) -> tuple[list[Atoms], list[Atoms]]:
    """(train, valid) frames by :func:`validation_flags` on their hashes (:func:`frame_hash`), in order."""
    flags = validation_flags([frame_hash(a) for a in frames], fraction)
    return [a for a, v in zip(frames, flags) if not v], [a for a, v in zip(frames, flags) if v]
