"""Labelling a file of structures outside a campaign (``ionflow label``).

Each structure gets a run folder ``RUNS/NNNNN-HASH``; when its calculation ends, its labelled
frame is written there as ``label.extxyz``, so an interrupted run loses nothing: running it
again reuses every ``ok`` label made at the same level of theory (settings hash) for the same
structure, and tries the others again. The output keeps the input's order:

* ``OUTPUT``: frames labelled ``ok``, with ``REF_energy`` (eV), ``REF_forces`` (eV/Å) and, where
  the code gives them, ``REF_stress``, ``REF_dipole``, ``REF_charges``; ``info`` also holds
  ``settings_hash``, ``label_code``, ``label_status``, ``label_wall_time_s``, ``label_run_dir``.
* ``OUTPUT-failed.extxyz`` (only when some failed): the other frames, unlabelled, with
  ``label_status`` and ``label_error``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.io import read, write

from ionflow.dft_adapters import get_adapter
from ionflow.dft_adapters.base import LabelResult
from ionflow.dft_adapters.pool import label_stream
from ionflow.platform.structures import REF_PREFIX, labelled_copy, structure_hash

LABEL_FILE = "label.extxyz"


@dataclass
class LabelOutcome:
    """What ``ionflow label`` did: counts, output files and the structures left without a label."""

    output: Path
    failed_output: Path | None
    n: int
    computed: int
    reused: int
    failures: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        ok = self.n - len(self.failures)
        text = f"{ok} of {self.n} structures labelled ({self.computed} computed, {self.reused} reused) -> {self.output}"
        if self.failed_output is not None:
            text += f"; {len(self.failures)} without a label -> {self.failed_output}"
        return text

    def failure_table(self):
        from rich.table import Table

        table = Table(title="structures without a label", title_justify="left")
        for header in ("frame", "status", "error", "run folder"):
            table.add_column(header, overflow="fold")
        for row in self.failures:
            table.add_row(str(row["index"]), row["status"], (row["error"] or "")[:300], row["run_dir"] or "-")
        return table


def _labelled_frame(atoms: Atoms, result: LabelResult) -> Atoms:
    """The input frame with the result's labels (``ok``) or its status and error (otherwise)."""
    if result.ok:
        out = labelled_copy(
            atoms, result.energy, result.forces, dipole=result.dipole, charges=result.charges, stress=result.stress
        )
    else:
        out = atoms.copy()
        out.calc = None
        for key in [k for k in out.info if k.startswith(REF_PREFIX)]:
            del out.info[key]
        for key in [k for k in out.arrays if k.startswith(REF_PREFIX)]:
            del out.arrays[key]
        out.info["label_error"] = (result.error or "").replace("\n", " ")
    out.info.update(
        settings_hash=result.settings_hash,
        label_code=f"{result.code} {result.code_version}",
        label_status=result.status,
        label_wall_time_s=round(float(result.wall_time_s), 3),
        label_run_dir=result.run_dir or "",
    )
    if result.charge_scheme:
        out.info["charge_scheme"] = result.charge_scheme
    return out


def _reusable(run_dir: Path, hash_: str, settings_hash: str) -> Atoms | None:
    """The ``ok`` label kept in ``run_dir`` for this structure and level of theory, if there is one."""
    path = run_dir / LABEL_FILE
    if not path.is_file():
        return None
    try:
        frame = read(path, format="extxyz")
    except Exception:  # noqa: BLE001  a half-written or damaged file is computed again
        return None
    info = frame.info
    if (
        info.get("label_status") == "ok"
        and info.get("settings_hash") == settings_hash
        and info.get("structure_hash") == hash_
    ):
        return frame
    return None


def label_file(
    frames: list[Atoms],
    output: Path,
    adapter: str,
    settings: dict[str, Any],
    runs: Path | None = None,
    workers: int = 1,
    threads: int | None = None,
    timeout_s: float | None = None,
    progress: AbstractContextManager[Callable[[int, int], None]] | None = None,
) -> LabelOutcome:
    """Label ``frames`` (see the module docstring); raise ``ValueError`` before any calculation
    when a frame cannot be labelled (charge state, periodicity, ...)."""
    output = Path(output)
    runs = Path(runs) if runs is not None else output.with_name(output.stem + "-runs")
    settings_hash = get_adapter(adapter, settings).settings_hash
    hashes = [structure_hash(a) for a in frames]
    dirs = [runs / f"{i:05d}-{h[:12]}" for i, h in enumerate(hashes)]
    done: dict[int, Atoms] = {}
    for i, run_dir in enumerate(dirs):
        frame = _reusable(run_dir, hashes[i], settings_hash)
        if frame is not None:
            done[i] = frame
    reused = len(done)
    todo = [i for i in range(len(frames)) if i not in done]
    with progress or nullcontext(lambda done, total: None) as update:
        update(reused, len(frames))
        stream = label_stream(
            adapter,
            settings,
            [frames[i] for i in todo],
            [dirs[i] for i in todo],
            workers=workers,
            threads=threads,
            timeout_s=timeout_s,
        )
        for k, result in stream:
            i = todo[k]
            frame = _labelled_frame(frames[i], result)
            frame.info["structure_hash"] = hashes[i]
            dirs[i].mkdir(parents=True, exist_ok=True)  # a worker that died early may not have made it
            write(str(dirs[i] / LABEL_FILE), frame, format="extxyz")
            done[i] = frame
            update(len(done), len(frames))
    ordered = [done[i] for i in range(len(frames))]
    good = [f for f in ordered if f.info["label_status"] == "ok"]
    bad = [(i, f) for i, f in enumerate(ordered) if f.info["label_status"] != "ok"]
    output.parent.mkdir(parents=True, exist_ok=True)
    write(str(output), good, format="extxyz")
    failed_output = None
    if bad:
        failed_output = output.with_name(output.stem + "-failed.extxyz")
        write(str(failed_output), [f for _, f in bad], format="extxyz")
    return LabelOutcome(
        output=output,
        failed_output=failed_output,
        n=len(frames),
        computed=len(todo),
        reused=reused,
        failures=[
            {
                "index": i,
                "status": f.info["label_status"],
                "error": f.info.get("label_error"),
                "run_dir": f.info.get("label_run_dir"),
            }
            for i, f in bad
        ],
    )
