"""The ase adapter: any ASE calculator in its own process and run folder, with timeouts,
SCF-failure detection, retries and clear failures. Real codes: GFN2-xTB behind a file-based
program that fails on request (``faulty.py``), and tblite's own ASE calculator."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.units import Bohr, Hartree
from pydantic import ValidationError
from tblite.interface import Calculator

from ionflow.dft_adapters import get_adapter
from ionflow.dft_adapters.ase_adapter import ASEAdapter, _merge_cp2k_input
from tests.structures import hydronium

FAULTY = f"{Path(__file__).with_name('faulty.py')}:FaultyXTB"
CHARGE_STATE = {"charge_parameter": "charge", "multiplicity_parameter": "multiplicity"}


def faulty(fault: str | None = None, timeout_s: float = 60, **settings) -> ASEAdapter:
    params = {"fault": fault} if fault else {}
    return get_adapter(
        "ase",
        {
            "calculator": FAULTY,
            "parameters": params,
            **CHARGE_STATE,
            "unconverged_patterns": ["SCC NOT CONVERGED"],
            **settings,
        },
        timeout_s=timeout_s,
    )


def direct_xtb(atoms: Atoms) -> tuple[float, np.ndarray]:
    calc = Calculator("GFN2-xTB", atoms.numbers, atoms.positions / Bohr, charge=float(atoms.info["charge"]))
    calc.set("verbosity", 0)
    res = calc.singlepoint()
    return float(res.get("energy")) * Hartree, -np.asarray(res.get("gradient")) * Hartree / Bohr


def test_file_based_calculator_matches_a_direct_call_and_keeps_its_files(tmp_path):
    atoms = hydronium()
    result = faulty().label([atoms], [tmp_path / "run"])[0]
    assert result.ok, result.error
    energy, forces = direct_xtb(atoms)
    assert result.energy == pytest.approx(energy, abs=1e-8)
    np.testing.assert_allclose(result.forces, forces, atol=1e-8)
    assert result.run_dir == str((tmp_path / "run").resolve())
    attempt = tmp_path / "run" / "attempt-0"
    for name in ("structure.extxyz", "job.json", "stdout.txt", "stderr.txt", "xtb-input.json", "xtb-output.txt"):
        assert (attempt / name).is_file(), name
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "ok"
    assert result.code == "faultyxtb" and result.host and result.wall_time_s > 0
    # the CPU time the child reported (its own and the code's processes) is the calculation's
    usage = json.loads((attempt / "usage.json").read_text())["cpu_time_s"]
    assert result.cpu_time_s == usage > 0


def test_in_process_ase_calculator_matches_direct_tblite():
    atoms = hydronium()
    adapter = get_adapter(
        "ase", {"calculator": "tblite.ase:TBLite", "parameters": {"method": "GFN2-xTB", "verbosity": 0}, **CHARGE_STATE}
    )
    result = adapter.label([atoms])[0]
    assert result.ok, result.error
    energy, forces = direct_xtb(atoms)
    assert result.energy == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(result.forces, forces, atol=1e-6)
    assert result.run_dir is None  # no folder asked for: a temporary one, removed


@pytest.mark.parametrize(
    ("fault", "status", "words"),
    [
        ("crash", "failed", "CalculationFailed"),
        ("garbage", "failed", "ValueError"),
        ("unconverged", "unconverged", "SCC NOT CONVERGED"),
    ],
)
def test_faults_become_statuses_with_the_reason(tmp_path, fault, status, words):
    result = faulty(fault, retries=[]).label([hydronium()], [tmp_path / fault])[0]
    assert result.status == status
    assert words in result.error
    assert result.energy is None and result.forces is None
    assert json.loads((tmp_path / fault / "result.json").read_text())["status"] == status


def test_a_hanging_code_is_killed_at_the_timeout(tmp_path):
    start = time.perf_counter()
    result = faulty("hang", timeout_s=3).label([hydronium()], [tmp_path / "hang"])[0]
    assert time.perf_counter() - start < 20
    assert result.status == "timeout" and "3 s" in result.error
    assert result.cpu_time_s is None  # killed before it could say: unknown, not zero


def test_retry_with_changed_settings_rescues_an_unconverged_run(tmp_path):
    counter = tmp_path / "count"
    adapter = get_adapter(
        "ase",
        {
            "calculator": FAULTY,
            **CHARGE_STATE,
            "unconverged_patterns": ["SCC NOT CONVERGED"],
            "parameters": {"faults": ["unconverged"], "counter": str(counter)},
            "retries": [{"fault": "ok"}],
        },
    )
    result = adapter.label([hydronium()], [tmp_path / "run"])[0]
    assert result.ok, result.error
    assert result.extra["attempts"] == 2 and result.extra["retries"] == [{"fault": "ok"}]
    assert (tmp_path / "run" / "attempt-1" / "xtb-output.txt").is_file()
    per_attempt = [json.loads((tmp_path / "run" / f"attempt-{n}" / "usage.json").read_text()) for n in (0, 1)]
    assert result.cpu_time_s == pytest.approx(sum(u["cpu_time_s"] for u in per_attempt))
    assert result.energy == pytest.approx(direct_xtb(hydronium())[0], abs=1e-8)


def test_every_retry_failing_to_converge_is_recorded_as_unconverged(tmp_path):
    adapter = faulty("unconverged", retries=[{"charge": 1}, {"faults": ["ok"]}])
    result = adapter.label([hydronium()], [tmp_path / "run"])[0]
    assert result.status == "unconverged"
    assert "nor with any of 2 retries" in result.error
    assert sorted(p.name for p in (tmp_path / "run").glob("attempt-*")) == ["attempt-0", "attempt-1", "attempt-2"]


def test_a_charge_the_calculator_cannot_be_told_is_refused_before_running(tmp_path):
    adapter = get_adapter("ase", {"calculator": FAULTY})  # no charge_parameter
    neutral = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    with pytest.raises(ValueError, match=r"structure 1 \(charge 1"):
        adapter.label([neutral, hydronium()], [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "a").exists()  # nothing ran


def test_settings_are_checked():
    with pytest.raises(ValidationError, match="unknown ASE calculator"):
        get_adapter("ase", {"calculator": "no_such_code"})
    with pytest.raises(ValidationError, match="does not exist"):
        get_adapter("ase", {"calculator": "/nowhere/calc.py:Calc"})
    with pytest.raises(ValidationError, match="regular expression"):
        get_adapter("ase", {"calculator": FAULTY, "unconverged_patterns": ["(unclosed"]})
    with pytest.raises(ValueError, match="not on PATH"):
        get_adapter("ase", {"calculator": "cp2k", "command": "no-such-cp2k -s"}).check([hydronium()])


def test_settings_hash_ignores_how_the_code_is_run():
    base = {"calculator": "cp2k", "parameters": {"xc": "PBE"}}
    a = get_adapter("ase", base)
    b = get_adapter("ase", {**base, "command": "cp2k_shell", "retries": []})
    c = get_adapter("ase", {**base, "parameters": {"xc": "BLYP"}})
    assert a.settings_hash == b.settings_hash != c.settings_hash


def test_cp2k_input_merge_replaces_and_adds():
    base = "&FORCE_EVAL\n&DFT\n&SCF\nMAX_SCF 5\nEPS_SCF 1e-6\n&END SCF\n&END DFT\n&END FORCE_EVAL"
    merged = _merge_cp2k_input(
        base,
        "&FORCE_EVAL\n&DFT\n&SCF\nMAX_SCF 50\n&MIXING\nALPHA 0.1\n&END MIXING\n&END SCF\n&END DFT\n&END FORCE_EVAL",
    )
    words = " ".join(merged.split())
    assert "MAX_SCF 50" in words and "MAX_SCF 5 " not in words and "EPS_SCF 1e-6" in words
    assert "&MIXING ALPHA 0.1 &END MIXING" in words
