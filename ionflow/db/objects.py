"""A content-addressed object store: structures, arrays and files named by their hash.

Rows in the database hold lineage; the bulky things they point to live here,
under one root folder, at paths relative to that root:

    structures/<hash[:2]>/<hash>.extxyz   one structure, hash = structure_hash(atoms)
    arrays/<sha[:2]>/<sha>.npz            named arrays (forces, charges, ...), sha = sha256 of the file
    <kind>/<sha><suffix>                  any file, e.g. a model checkpoint (kind "checkpoints")

Writing is idempotent (the same content lands at the same path once) and atomic
(a temporary file in the target folder is renamed into place, so a reader or a
second writer never sees half a file).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from ase import Atoms
from ase.io import read, write

from ionflow.platform.structures import HASH_DECIMALS, charge_of, multiplicity_of, structure_hash

_CHUNK = 1 << 20
# a fixed zip-entry timestamp makes an npz's bytes (and so its sha256) depend on the arrays only
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write_to: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in its folder, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_to(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz archive (what ``np.savez`` writes) with reproducible bytes: sorted keys, fixed dates."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.asanyarray(arrays[key]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE), npy.getvalue())
    return buf.getvalue()


def canonical_structure(atoms: Atoms) -> Atoms:
    """What the store keeps of a structure: exactly what its hash covers.

    Numbers, positions, cell, pbc and ``info`` charge/multiplicity (ints); no
    calculator, labels or other ``info``/``arrays`` (reference labels belong to a
    calculation's arrays). Positions are rounded to ``HASH_DECIMALS`` Å, the
    resolution of the hash: extxyz writes 8 decimals, and an unrounded coordinate
    within 5e-9 Å of a rounding boundary would otherwise read back with another hash.
    """
    out = Atoms(
        numbers=atoms.numbers,
        positions=np.round(np.asarray(atoms.positions, dtype=np.float64), HASH_DECIMALS) + 0.0,
        cell=atoms.cell.array,
        pbc=atoms.pbc,
    )
    out.info["charge"] = charge_of(atoms)
    out.info["multiplicity"] = multiplicity_of(atoms)
    return out


class ObjectStore:
    """Files named by their content under ``root``; every path in and out is relative to ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, relpath: str) -> Path:
        """Absolute path of ``relpath``; refuses paths that leave the store."""
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"{relpath!r} is outside the object store {self.root}")
        return path

    # -- structures -------------------------------------------------------

    def relative(self, path: str | Path | None) -> str | None:
        """``path`` relative to the root when it lies under it (a campaign's run folders), so that a
        moved campaign folder still resolves; other paths unchanged, None stays None."""
        if path is None:
            return None
        resolved = Path(path).expanduser().resolve()
        return str(resolved.relative_to(self.root)) if resolved.is_relative_to(self.root) else str(path)

    def put_structure(self, atoms: Atoms) -> str:
        """Store a structure as extxyz (see :func:`canonical_structure`); return its relative path."""
        atoms = canonical_structure(atoms)
        digest = structure_hash(atoms)
        relpath = f"structures/{digest[:2]}/{digest}.extxyz"
        target = self.path(relpath)
        if not target.exists():
            text = io.StringIO()
            write(text, atoms, format="extxyz")
            _atomic_write(target, lambda f: f.write(text.getvalue().encode()))
        return relpath

    def get_structure(self, relpath: str) -> Atoms:
        """Read a stored structure; ``info`` charge and multiplicity are Python ints."""
        atoms = read(self.path(relpath), format="extxyz", index=0)
        atoms.calc = None
        atoms.info["charge"] = charge_of(atoms)
        atoms.info["multiplicity"] = multiplicity_of(atoms)
        return atoms

    # -- arrays -------------------------------------------------------------

    def put_arrays(self, arrays: dict[str, np.ndarray]) -> tuple[str, str]:
        """Store named arrays as an npz named by its sha256; return (relative path, sha256).

        Object arrays are refused (they would need pickle).
        """
        data = _npz_bytes(arrays)
        digest = hashlib.sha256(data).hexdigest()
        relpath = f"arrays/{digest[:2]}/{digest}.npz"
        target = self.path(relpath)
        if not target.exists():
            _atomic_write(target, lambda f: f.write(data))
        return relpath, digest

    def get_arrays(self, relpath: str) -> dict[str, np.ndarray]:
        """Read an npz written by :meth:`put_arrays` (never unpickles)."""
        with np.load(self.path(relpath), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}

    # -- files --------------------------------------------------------------

    def put_file(self, src: str | Path, kind: str) -> tuple[str, str]:
        """Copy a file to ``<kind>/<sha256><suffix>``; return (relative path, sha256)."""
        src = Path(src)
        folder = self.path(kind)
        folder.mkdir(parents=True, exist_ok=True)
        # hash while copying, so the name matches the bytes even if src changes meanwhile
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{src.name}.", suffix=".tmp")
        try:
            with open(src, "rb") as source, os.fdopen(fd, "wb") as copy:
                while chunk := source.read(_CHUNK):
                    h.update(chunk)
                    copy.write(chunk)
            digest = h.hexdigest()
            relpath = f"{kind}/{digest}{src.suffix}"
            os.replace(tmp, self.path(relpath))
        finally:
            Path(tmp).unlink(missing_ok=True)
        return relpath, digest

    def copy_from(self, source: ObjectStore, relpath: str) -> None:
        """Copy the object at ``relpath`` from another store, unless this one has it.

        Paths are content addresses, so the same ``relpath`` in two stores names the
        same bytes; callers that know a sha256 should :meth:`verify` the copy.
        """
        target = self.path(relpath)
        if target.exists():
            return
        src = source.path(relpath)

        def copy(f: IO[bytes]) -> None:
            with open(src, "rb") as s:
                while chunk := s.read(_CHUNK):
                    f.write(chunk)

        _atomic_write(target, copy)

    def verify(self, relpath: str, sha256: str) -> bool:
        """True when ``relpath`` exists and its bytes have this sha256."""
        path = self.path(relpath)
        return path.is_file() and sha256_file(path) == sha256
