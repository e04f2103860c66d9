"""Fixtures of the adapter tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from ase import Atoms

from ionflow.dft_adapters.base import InProcessAdapter


@pytest.fixture
def record_compute(monkeypatch) -> Callable[[InProcessAdapter], list[Atoms]]:
    """Replace an in-process adapter's ``_compute`` by a stub with the same signature that
    records each structure it is given (and returns a failed result); returns the record.

    A test that a batch is refused "before computing" then asserts the record is empty. The stub
    takes ``_compute``'s very arguments: one that cannot would raise ``TypeError``, which the
    adapter turns into a failed result, and the check would pass whatever the adapter did.
    """

    def patch(adapter: InProcessAdapter) -> list[Atoms]:
        calls: list[Atoms] = []

        def compute(atoms: Atoms, run_dir: Path | None) -> dict:
            calls.append(atoms)
            return {"status": "failed", "error": "stub calculation"}

        monkeypatch.setattr(adapter, "_compute", compute)
        return calls

    return patch
