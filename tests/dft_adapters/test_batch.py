"""The batch folder a remote job labels (``ionflow label-batch``): the same labels as the local
pool, bit for bit, results kept as each calculation ends, and a rerun computes only what is left."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ionflow.dft_adapters.batch import (
    BATCH_FILE,
    DONE_FILE,
    RESULTS_FILE,
    STRUCTURES_FILE,
    atoms_text,
    batch_parameters,
    read_results,
    read_structures_count,
    read_structures_file,
    run_batch,
    structures_text,
)
from ionflow.dft_adapters.pool import label_stream
from ionflow.platform.structures import structure_hash
from tests.structures import hydronium, water


def _batch(folder, frames, **params) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BATCH_FILE).write_text(json.dumps(batch_parameters("tblite", {}, **params)))
    (folder / STRUCTURES_FILE).write_text(structures_text(atoms_text(a) for a in frames))


def test_a_batch_gives_the_local_labels_bit_for_bit_and_a_rerun_only_what_is_left(tmp_path):
    frames = [water(), hydronium(), water(-1, 2)]
    frames[0].positions[1, 0] += 0.0123456789
    folder = tmp_path / "job"
    _batch(folder, frames, threads=1, timeout_s=60)
    assert read_structures_count((folder / STRUCTURES_FILE).read_text()) == 3
    # the job is run as a user's cluster runs it: `ionflow label-batch` in the job's folder
    proc = subprocess.run(
        [sys.executable, "-m", "ionflow.cli", "label-batch", "."],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = read_results((folder / RESULTS_FILE).read_text())
    assert sorted(results) == [0, 1, 2]
    assert json.loads((folder / DONE_FILE).read_text()) == {"n": 3, "counts": {"ok": 3}}
    # locally, as a campaign's label step labels them: read back from the object store's extxyz
    # (the same text the job gets), on the pool with the same threads
    stored = read_structures_file(folder / STRUCTURES_FILE)
    assert [structure_hash(a) for a in stored] == [structure_hash(a) for a in frames]
    local = [r for _, r in sorted(label_stream("tblite", {}, stored, workers=1, threads=1, timeout_s=60))]
    for i, expected in enumerate(local):
        got = results[i]
        assert got.status == "ok" and got.settings_hash == expected.settings_hash
        assert got.energy == expected.energy  # exact: floats travel as shortest-repr JSON
        np.testing.assert_array_equal(got.forces, expected.forces)
        np.testing.assert_array_equal(got.charges, expected.charges)
        assert got.run_dir.startswith(str(folder.resolve() / "runs"))

    # a job killed during its second calculation: one line kept, the next cut short
    lines = (folder / RESULTS_FILE).read_text().splitlines()
    (folder / RESULTS_FILE).write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    (folder / DONE_FILE).unlink()
    kept = read_results((folder / RESULTS_FILE).read_text())
    assert list(kept) == [json.loads(lines[0])["index"]]
    counts = run_batch(folder, progress=False)
    assert counts == {"ok": 3}
    again = read_results((folder / RESULTS_FILE).read_text())
    assert sorted(again) == [0, 1, 2] and all(again[i].energy == local[i].energy for i in range(3))


def test_a_bad_batch_is_refused_before_any_calculation(tmp_path):
    folder = tmp_path / "job"
    _batch(folder, [water(0, 2)])  # 10 electrons cannot be a doublet
    with pytest.raises(ValueError, match="multiplicity|electron"):
        run_batch(folder, progress=False)
    assert not (folder / RESULTS_FILE).exists() or not (folder / RESULTS_FILE).read_text()
    params = json.loads((folder / BATCH_FILE).read_text())
    (folder / BATCH_FILE).write_text(json.dumps({**params, "format": 99}))
    with pytest.raises(ValueError, match="batch format 99"):
        run_batch(folder, progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "ionflow.cli", "label-batch", str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not a batch folder" in proc.stderr
