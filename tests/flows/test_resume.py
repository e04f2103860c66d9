"""Interrupt a real campaign (kill -9 of the whole process group, or Ctrl-C) and run it again."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from ionflow.db import Calculation, Campaign, Iteration, make_engine, session_factory, session_scope

from .conftest import tiny_campaign, write_campaign

# PySCF at a minimal level of theory: slow enough (~0.3 s a calculation) to be caught mid-labelling.
PYSCF_FAST = {"adapter": "pyscf", "settings": {"xc": "lda", "basis": "sto-3g", "density_fit": False, "conv_tol": 1e-7}}


def _start(config: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ionflow.cli", "run", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the signal reaches the Prefect server too
        # as a terminal would: SIGINT raises KeyboardInterrupt (a test runner may start us with it ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _calculations(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            return con.execute("SELECT id, structure_id, created_at FROM calculation ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # schema not created yet
        return []


def _wait_for(db: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _calculations(db)
        if len(rows) >= n:
            return rows
        if proc.poll() is not None:
            raise AssertionError(f"campaign ended before {n} calculations:\n{proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} calculations after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_campaign_resumes_without_repeating_or_losing_calculations(tmp_path, sig):
    config = tiny_campaign(tmp_path, iterations=1, reference=PYSCF_FAST)
    path = write_campaign(tmp_path, config)
    db = tmp_path / "runs" / "tiny" / "ionflow.db"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1")

    proc = _start(path, env)
    _wait_for(db, 3, proc)
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=60)
    output = proc.stdout.read().decode()
    if sig == signal.SIGINT:
        assert code == 130, output[-3000:]
        assert "run the same command again to resume" in output
    else:
        assert code == -signal.SIGKILL
    before = _calculations(db)
    assert 3 <= len(before) < 9, "interrupted too late to test anything"

    proc = _start(path, env)
    assert proc.wait(timeout=400) == 0, proc.stdout.read().decode()[-3000:]
    after = _calculations(db)

    # nothing lost: every calculation finished before the interruption is still there, unchanged
    assert after[: len(before)] == before
    # nothing repeated: one calculation per structure
    structures = [row[1] for row in after]
    assert len(structures) == len(set(structures))
    sessions = session_factory(make_engine(f"sqlite:///{db}"))
    with session_scope(sessions) as s:
        assert s.scalar(select(Campaign.status)) == "finished"
        assert [it.status for it in s.scalars(select(Iteration).order_by(Iteration.index))] == ["done", "done"]
        assert all(c.status == "ok" for c in s.scalars(select(Calculation)))
