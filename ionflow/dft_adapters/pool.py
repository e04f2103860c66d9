"""Parallel labelling: a batch of structures over k workers, each with bounded threads.

:func:`label_stream` yields ``(index, LabelResult)`` as each calculation ends, so that a
caller can commit every result at once and lose nothing when it is stopped.

* Adapters that compute in the calling process (PySCF, tblite) run in k worker processes
  (fresh interpreters); each gets ``OMP_NUM_THREADS`` (and the BLAS equivalents) set to
  ``threads`` before it imports anything, so k workers use k × threads cores. A worker that
  crashes (segfault, out of memory) or passes ``timeout_s`` is killed and replaced; its
  structure gets a ``failed`` or ``timeout`` result and the batch goes on.
* Adapters that already run each calculation in a child process (``isolated``: the ase
  adapter) are driven from k threads of this process; they enforce the timeout and the
  thread bound on their own children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any

from ase import Atoms

from ionflow.dft_adapters import ReferenceAdapter, get_adapter
from ionflow.dft_adapters.base import (
    LabelResult,
    check_run_dirs,
    child_environment,
    finish_run_dir,
    make_result,
)

#: What a worker sends once it has imported the code, before its first job.
READY = "ready"


def default_threads(workers: int) -> int:
    """Threads per worker that fill this machine's cores without oversubscribing them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _worker_main(fd: int) -> None:
    """A worker process: label the jobs sent on connection ``fd`` one at a time until None comes."""
    conn = Connection(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    name, settings = conn.recv()
    adapter = get_adapter(name, settings)
    conn.send(READY)  # the code is imported: from now on a job's clock measures its calculation
    while True:
        job = conn.recv()
        if job is None:
            return
        index, atoms, run_dir = job
        result = adapter.label([atoms], [run_dir] if run_dir is not None else None)[0]
        conn.send((index, result))


@dataclass
class _Slot:
    """One worker process and the job it is on."""

    process: subprocess.Popen
    conn: Connection
    job: tuple[int, Atoms, Path | None] | None = None
    started: float = 0.0
    #: whether the worker has imported the code (sent READY) and takes jobs
    ready: bool = False


class _Workers:
    """k worker processes, replaced when one dies or is killed.

    Workers are fresh interpreters (``python -m ionflow.dft_adapters.pool FD``), not
    ``multiprocessing`` children: nothing of the caller's ``__main__`` is re-imported, and the
    thread bound is in their environment before numpy or the code loads.
    """

    def __init__(self, name: str, settings: dict[str, Any], workers: int, threads: int) -> None:
        self.name, self.settings = name, settings
        self.env = child_environment(threads)
        self.slots = [self._start() for _ in range(workers)]

    def _start(self) -> _Slot:
        ours, theirs = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", "ionflow.dft_adapters.pool", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=self.env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # killing a worker kills whatever it started
        )
        theirs.close()
        conn = Connection(ours.detach())
        conn.send((self.name, self.settings))
        return _Slot(process, conn)

    def kill(self, slot: _Slot) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(slot.process.pid, signal.SIGKILL)
        slot.process.wait()
        slot.conn.close()

    def hand_over(self, slot: _Slot, job: tuple[int, Atoms, Path | None]) -> bool:
        """Send ``job`` to an idle, ready worker and start its clock. A worker that died while idle
        is replaced instead (its job never started, so nothing failed): False, the job stays queued."""
        try:
            if slot.process.poll() is None:
                slot.conn.send(job)
                slot.job, slot.started = job, time.monotonic()
                return True
        except OSError:
            pass
        self.replace(slot)
        return False

    def mark_ready(self, slot: _Slot) -> None:
        """Read a starting worker's READY message; a worker that dies before it is an error."""
        try:
            message = slot.conn.recv()
        except (EOFError, OSError):
            message = None
        if message != READY:
            raise RuntimeError("a labelling worker died as it started; see its stderr above")
        slot.ready = True

    def replace(self, slot: _Slot) -> None:
        self.kill(slot)
        fresh = self._start()
        slot.process, slot.conn, slot.job, slot.ready = fresh.process, fresh.conn, None, False

    def close(self) -> None:
        for slot in self.slots:
            if slot.job is not None:  # stopped mid-calculation (the caller gave up): no waiting
                self.kill(slot)
                continue
            with contextlib.suppress(OSError):
                slot.conn.send(None)
        deadline = time.monotonic() + 5
        for slot in self.slots:
            if slot.conn.closed:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                slot.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            self.kill(slot)


def _lost(
    adapter: ReferenceAdapter, job: tuple[int, Atoms, Path | None], status: str, error: str, seconds: float
) -> LabelResult:
    """The result of a calculation whose worker was killed or died (its run folder says so too)."""
    _, _, run_dir = job
    result = make_result(adapter, seconds, run_dir, status=status, error=error)
    if run_dir is not None and run_dir.exists():
        finish_run_dir(run_dir, result)
    return result


def label_stream(
    name: str,
    settings: dict[str, Any] | None,
    structures: Sequence[Atoms],
    run_dirs: Sequence[Path] | None = None,
    workers: int = 1,
    threads: int | None = None,
    timeout_s: float | None = None,
) -> Iterator[tuple[int, LabelResult]]:
    """Label ``structures`` with adapter ``name`` on ``workers`` workers; yield ``(index, result)``
    in the order the calculations end.

    Every structure is checked (charge state, periodicity, the adapter's own rules) before
    any calculation starts; a bad one raises ``ValueError`` naming it. ``threads`` bounds the
    threads of each calculation (default: the cores divided among the workers);
    ``timeout_s`` is the wall-time limit of one calculation.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s}")
    threads = threads or default_threads(workers)
    settings = dict(settings or {})
    adapter = get_adapter(name, settings, timeout_s=timeout_s, num_threads=threads)
    structures = list(structures)
    adapter.check(structures)
    dirs = check_run_dirs(structures, run_dirs)
    jobs = deque((i, atoms, d) for i, (atoms, d) in enumerate(zip(structures, dirs)))
    if not jobs:
        return
    if adapter.isolated:
        yield from _threaded(adapter, jobs, workers)
    elif workers == 1 and timeout_s is None:
        for i, atoms, run_dir in jobs:  # no process to bound: the calling process labels
            yield i, adapter.label([atoms], [run_dir] if run_dir is not None else None)[0]
    else:
        yield from _processes(adapter, name, settings, jobs, workers, threads, timeout_s)


def _threaded(adapter: ReferenceAdapter, jobs: deque, workers: int) -> Iterator[tuple[int, LabelResult]]:
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ionflow-label") as pool:
        running = {}
        try:
            while jobs or running:
                while jobs and len(running) < workers:
                    i, atoms, run_dir = jobs.popleft()
                    running[pool.submit(adapter.label, [atoms], [run_dir] if run_dir is not None else None)] = i
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield running.pop(future), future.result()[0]
        finally:
            for future in running:
                future.cancel()


def _processes(
    adapter: ReferenceAdapter,
    name: str,
    settings: dict[str, Any],
    jobs: deque,
    workers: int,
    threads: int,
    timeout_s: float | None,
) -> Iterator[tuple[int, LabelResult]]:
    pool = _Workers(name, settings, min(workers, len(jobs)), threads)
    try:
        while True:
            for slot in pool.slots:
                if slot.ready and slot.job is None and jobs and pool.hand_over(slot, jobs[0]):
                    jobs.popleft()
            busy = [slot for slot in pool.slots if slot.job is not None]
            starting = [slot for slot in pool.slots if not slot.ready] if jobs else []
            if not busy and not starting:
                return
            wait_s = None
            if timeout_s is not None and busy:
                wait_s = max(0.0, min(slot.started + timeout_s for slot in busy) - time.monotonic())
            ready = set(wait_any([s.conn for s in busy + starting], timeout=wait_s))
            for slot in starting:
                if slot.conn in ready:
                    pool.mark_ready(slot)
            now = time.monotonic()
            for slot in busy:
                if slot.conn in ready:
                    try:
                        index, result = slot.conn.recv()
                    except (EOFError, OSError):  # the worker died: its end of the socket closed
                        code = slot.process.wait()
                        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                        index = slot.job[0]
                        result = _lost(
                            adapter,
                            slot.job,
                            "failed",
                            f"the labelling worker died ({how}) during the calculation",
                            now - slot.started,
                        )
                        pool.replace(slot)
                    else:
                        slot.job = None
                    yield index, result
                elif timeout_s is not None and now - slot.started >= timeout_s:
                    index = slot.job[0]
                    result = _lost(
                        adapter,
                        slot.job,
                        "timeout",
                        f"no result after {timeout_s:g} s: the calculation was killed",
                        now - slot.started,
                    )
                    pool.replace(slot)
                    yield index, result
    finally:
        pool.close()


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]))
