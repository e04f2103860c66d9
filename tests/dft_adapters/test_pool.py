"""Parallel labelling: k workers, bounded threads, and a batch that survives dying,
hanging and failing calculations."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from ionflow.dft_adapters import get_adapter
from ionflow.dft_adapters.pool import label_stream
from ionflow.platform.structures import rattled, with_charge_state

FAULTY = f"{Path(__file__).with_name('faulty.py')}:FaultyXTB"


def waters(n: int) -> list[Atoms]:
    return rattled(with_charge_state(molecule("H2O"), 0, 1), n, stdev=0.05, seed=0)


def _workers_of_this_process() -> list[int]:
    """Pids of this process's labelling workers (python -m ionflow.dft_adapters.pool)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"ionflow.dft_adapters.pool" in cmdline:
            found.append(int(entry.name))
    return found


def test_workers_give_the_same_labels_as_one_process(tmp_path):
    frames = waters(4)
    serial = get_adapter("tblite").label(frames)
    parallel = dict(label_stream("tblite", {}, frames, [tmp_path / str(i) for i in range(4)], workers=2, threads=1))
    assert sorted(parallel) == [0, 1, 2, 3]
    for i, result in enumerate(serial):
        assert parallel[i].ok
        assert parallel[i].energy == pytest.approx(result.energy, abs=1e-9)
        np.testing.assert_allclose(parallel[i].forces, result.forces, atol=1e-9)
        assert parallel[i].run_dir == str(tmp_path / str(i))


def test_a_killed_worker_fails_its_calculation_and_the_batch_goes_on(tmp_path):
    # two slow PySCF calculations (benzene), then two fast ones (water)
    frames = [molecule("C6H6"), molecule("C6H6"), *waters(2)]
    for atoms in frames:
        atoms.info.update(charge=0, multiplicity=1)
    dirs = [tmp_path / str(i) for i in range(4)]
    seen_env = []

    def kill_when_both_run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all((d / "pyscf.log").exists() for d in dirs[:2]):
                for pid in _workers_of_this_process():
                    seen_env.append(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
                    os.kill(pid, signal.SIGKILL)  # what the out-of-memory killer does
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_both_run)
    killer.start()
    results = dict(label_stream("pyscf", {"basis": "def2-svp"}, frames, dirs, workers=2, threads=1))
    killer.join()
    assert len(seen_env) == 2 and all(b"OMP_NUM_THREADS=1" in env for env in seen_env)  # bounded before loading
    assert sorted(results) == [0, 1, 2, 3]
    assert [results[i].status for i in range(4)] == ["failed", "failed", "ok", "ok"]
    for r in (results[0], results[1]):
        assert "SIGKILL" in r.error
        assert (Path(r.run_dir) / "result.json").is_file()


def test_a_calculation_past_the_timeout_is_killed_and_the_next_one_runs(tmp_path):
    big, small = molecule("C6H6"), molecule("H2O")  # benzene/def2-svp takes far longer than 2 s
    for atoms in (big, small):
        atoms.info.update(charge=0, multiplicity=1)
    start = time.perf_counter()
    results = dict(
        label_stream(
            "pyscf",
            {"basis": "def2-svp"},
            [big, small],
            [tmp_path / "b", tmp_path / "s"],
            workers=1,
            threads=1,  # two OpenMP threads on a busy 2-core machine take water past 2 s
            timeout_s=2,
        )
    )
    assert time.perf_counter() - start < 30
    assert results[0].status == "timeout" and "2 s" in results[0].error
    assert results[1].ok


def test_isolated_adapter_runs_its_calculations_side_by_side(tmp_path):
    frames = waters(4)
    settings = {
        "calculator": FAULTY,
        "retries": [],
        "parameters": {"faults": ["crash", "hang", "garbage"], "counter": str(tmp_path / "count")},
    }
    start = time.perf_counter()
    results = dict(
        label_stream("ase", settings, frames, [tmp_path / str(i) for i in range(4)], workers=2, threads=1, timeout_s=4)
    )
    elapsed = time.perf_counter() - start
    statuses = sorted(r.status for r in results.values())
    assert statuses == ["failed", "failed", "ok", "timeout"]
    assert elapsed < 4 + 8  # the hang did not hold up the others
    ok = next(r for r in results.values() if r.ok)
    assert "OMP_NUM_THREADS=1" in (Path(ok.run_dir) / "attempt-0" / "stdout.txt").read_text()


def test_bad_input_is_refused_before_any_work(tmp_path):
    frames = waters(2)
    frames[1].info["multiplicity"] = 2  # H2O has an even electron count
    with pytest.raises(ValueError, match="structure 1"):
        list(label_stream("tblite", {}, frames, [tmp_path / "0", tmp_path / "1"], workers=2))
    assert not (tmp_path / "0").exists()
    with pytest.raises(ValueError, match="workers"):
        list(label_stream("tblite", {}, frames, workers=0))
