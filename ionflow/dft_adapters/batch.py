"""A batch of reference calculations in a folder: what a remote job runs (``ionflow label-batch``).

The folder holds ``batch.json`` (adapter, settings, workers, threads, timeout) and
``structures.extxyz`` (the structures, as the campaign's object store keeps them). Running the
batch labels them with ionflow's own pool (:func:`~ionflow.dft_adapters.pool.label_stream`: the
same adapters, settings, retries, timeouts and failure policy as a local label step), each in
``runs/NNNNN-HASH``, and appends one JSON line per calculation to ``results.jsonl`` as it ends
(flushed and synced), so a job that is killed keeps every result it finished. ``done.json`` is
written last, with the counts per status. Running it again in the same folder computes only the
structures without a result.

Floats travel as JSON numbers (shortest repr, exact round trip): a result read back is bit for
bit the one the adapter returned.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import read, write

from ionflow.dft_adapters.base import LabelResult
from ionflow.platform.structures import charge_of, multiplicity_of, structure_hash

BATCH_FILE = "batch.json"
STRUCTURES_FILE = "structures.extxyz"
RESULTS_FILE = "results.jsonl"
DONE_FILE = "done.json"
#: Version of the folder's format; a runner refuses a batch of another version.
FORMAT = 1

_ARRAYS = ("forces", "stress", "dipole", "charges")


def batch_parameters(
    adapter: str,
    settings: dict[str, Any],
    workers: int = 1,
    threads: int | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """The contents of ``batch.json``."""
    return {
        "format": FORMAT,
        "adapter": adapter,
        "settings": settings,
        "workers": workers,
        "threads": threads,
        "timeout_s": timeout_s,
    }


def structures_text(texts: Iterable[str]) -> str:
    """One extxyz file of several single-frame extxyz texts (the object store's files, verbatim)."""
    return "".join(t if t.endswith("\n") else t + "\n" for t in texts)


def atoms_text(atoms: Atoms) -> str:
    text = io.StringIO()
    write(text, atoms, format="extxyz")
    return text.getvalue()


def read_structures_count(text: str) -> int:
    """How many frames an extxyz text holds (from its atom-count lines, without parsing frames)."""
    lines = text.splitlines()
    n = i = 0
    while i < len(lines) and lines[i].strip():
        i += int(lines[i]) + 2
        n += 1
    return n


def read_structures_file(path: Path) -> list[Atoms]:
    """The batch's structures, with charge and multiplicity as Python ints (as the object store
    gives them to a local label step)."""
    frames = read(path, format="extxyz", index=":")
    for atoms in frames:
        atoms.calc = None
        atoms.info["charge"] = charge_of(atoms)
        atoms.info["multiplicity"] = multiplicity_of(atoms)
    return frames


def result_to_json(result: LabelResult) -> dict[str, Any]:
    data = asdict(result)
    for key in _ARRAYS:
        if data[key] is not None:
            data[key] = np.asarray(data[key], dtype=float).tolist()
    data["extra"] = json.loads(json.dumps(data["extra"], default=str))
    return data


def result_from_json(data: dict[str, Any]) -> LabelResult:
    names = {f.name for f in fields(LabelResult)}
    values = {k: v for k, v in data.items() if k in names}
    for key in _ARRAYS:
        if values.get(key) is not None:
            values[key] = np.asarray(values[key], dtype=float)
    return LabelResult(**values)


def read_results(text: str) -> dict[int, LabelResult]:
    """The results of a ``results.jsonl`` text by structure index; a last line cut short by a
    killed job is ignored (its structure has no result)."""
    out: dict[int, LabelResult] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[int(record["index"])] = result_from_json(record["result"])
    return out


def run_batch(folder: Path, progress: bool = True) -> dict[str, int]:
    """Label the batch in ``folder`` (see the module docstring); return the counts per status."""
    from ionflow.dft_adapters.pool import label_stream

    folder = Path(folder).resolve()
    params = json.loads((folder / BATCH_FILE).read_text())
    if params.get("format") != FORMAT:
        raise ValueError(
            f"{folder / BATCH_FILE}: batch format {params.get('format')!r}, this ionflow reads {FORMAT}; "
            "install the same ionflow version here as where the campaign runs"
        )
    structures = read_structures_file(folder / STRUCTURES_FILE)
    results_path = folder / RESULTS_FILE
    done = read_results(results_path.read_text()) if results_path.exists() else {}
    if results_path.exists():  # keep whole lines only: a line cut short by a killed job would swallow the next
        results_path.write_text(
            "".join(json.dumps({"index": i, "result": result_to_json(r)}) + "\n" for i, r in done.items())
        )
    todo = [i for i in range(len(structures)) if i not in done]
    dirs = [folder / "runs" / f"{i:05d}-{structure_hash(structures[i])[:12]}" for i in todo]
    counts: dict[str, int] = {}
    for result in done.values():
        counts[result.status] = counts.get(result.status, 0) + 1
    with results_path.open("a") as out:
        stream = label_stream(
            params["adapter"],
            params["settings"],
            [structures[i] for i in todo],
            dirs,
            workers=params["workers"],
            threads=params["threads"],
            timeout_s=params["timeout_s"],
        )
        for k, result in stream:
            out.write(json.dumps({"index": todo[k], "result": result_to_json(result)}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            counts[result.status] = counts.get(result.status, 0) + 1
            if progress:
                print(f"structure {todo[k]}: {result.status} in {result.wall_time_s:.1f} s", file=sys.stderr)
    (folder / DONE_FILE).write_text(json.dumps({"n": len(structures), "counts": counts}))
    return counts
