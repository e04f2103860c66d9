"""``ionflow label``: any structures in, labelled extxyz out, failures listed, reruns reuse labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.io import read, write
from typer.testing import CliRunner

from ionflow.cli import app
from ionflow.dft_adapters import get_adapter
from ionflow.platform.structures import rattled

from ..conftest import hydronium

runner = CliRunner()
FAULTY = str(Path(__file__).parents[1] / "dft_adapters" / "faulty.py") + ":FaultyXTB"


@pytest.fixture
def frames(tmp_path):
    """Three H3O+ frames (charge from info) and one neutral OH radical (a doublet), in one extxyz."""
    from ase import Atoms

    cations = rattled(hydronium(), n=3, stdev=0.05, seed=4)
    radical = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]], info={"charge": 0, "multiplicity": 2})
    path = tmp_path / "in.extxyz"
    write(str(path), [*cations, radical], format="extxyz")
    return path, [*cations, radical]


def test_labels_match_the_adapter_and_keep_order_and_charge(tmp_path, frames):
    path, _ = frames
    out = tmp_path / "out.extxyz"
    result = runner.invoke(
        app, ["label", str(path), str(out), "--adapter", "tblite", "--workers", "2", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "4 of 4 structures labelled (4 computed, 0 reused)" in result.output
    labelled = read(str(out), index=":")
    direct = get_adapter("tblite").label(read(str(path), index=":"))  # the positions as written
    for frame, ref in zip(labelled, direct):  # extxyz keeps 8 decimals
        assert frame.info["REF_energy"] == pytest.approx(ref.energy, abs=1e-7)
        np.testing.assert_allclose(frame.arrays["REF_forces"], ref.forces, atol=1e-7)
        np.testing.assert_allclose(frame.arrays["REF_charges"], ref.charges, atol=1e-7)
        assert frame.info["label_status"] == "ok" and frame.info["settings_hash"] == get_adapter("tblite").settings_hash
        assert Path(frame.info["label_run_dir"], "result.json").is_file()
    assert [f.info["charge"] for f in labelled] == [1, 1, 1, 0]
    assert labelled[3].info["multiplicity"] == 2
    assert not (tmp_path / "out-failed.extxyz").exists()

    again = runner.invoke(app, ["label", str(path), str(out), "--adapter", "tblite"])
    assert again.exit_code == 0 and "(0 computed, 4 reused)" in again.output
    # another level of theory is a different label: nothing reused
    gfn1 = runner.invoke(app, ["label", str(path), str(out), "--adapter", "tblite", "--set", "method=GFN1-xTB"])
    assert gfn1.exit_code == 0 and "(4 computed, 0 reused)" in gfn1.output


def test_failures_are_listed_and_written_apart(tmp_path, frames):
    path, _ = frames
    out = tmp_path / "out.extxyz"
    args = [
        "label",
        str(path),
        str(out),
        "--adapter",
        "ase",
        "--timeout",
        "8",  # the hang is killed; the healthy ones finish well within it, also on a loaded machine
        "--set",
        f"calculator={FAULTY}",
        "--set",
        "charge_parameter=charge",
        "--set",
        "multiplicity_parameter=multiplicity",
        "--set",
        "retries=[]",
        "--set",
        "parameters.faults=[garbage, hang]",
        "--set",
        f"parameters.counter={tmp_path / 'count'}",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "2 of 4 structures labelled" in result.output
    failed = read(str(tmp_path / "out-failed.extxyz"), index=":")
    assert sorted(f.info["label_status"] for f in failed) == ["failed", "timeout"]
    assert all(f.info["label_error"] and "REF_energy" not in f.info for f in failed)
    assert len(read(str(out), index=":")) == 2

    # the rerun reuses the two labels and computes only the two failures (the code now behaves)
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert "4 of 4 structures labelled (2 computed, 2 reused)" in rerun.output


def test_bad_input_is_refused_before_any_calculation(tmp_path, frames):
    path, originals = frames
    originals[1].info["multiplicity"] = 2  # H3O+ has an even electron count
    bad = tmp_path / "bad.extxyz"
    write(str(bad), originals, format="extxyz")
    out = tmp_path / "out.extxyz"
    result = runner.invoke(app, ["label", str(bad), str(out), "--adapter", "tblite"])
    assert result.exit_code == 2 and "structure 1" in result.output
    assert not (tmp_path / "out-runs").exists()
    result = runner.invoke(app, ["label", str(path), str(out), "--adapter", "pyscf", "--set", "xc=nonsense"])
    assert result.exit_code == 2 and "unknown exchange-correlation functional" in result.output
    result = runner.invoke(app, ["label", str(path), str(out), "--adapter", "orca"])
    assert result.exit_code == 2 and "unknown adapter" in result.output


def test_training_refuses_labels_of_two_levels_of_theory(tmp_path, frames):
    path, _ = frames
    for method in ("GFN2-xTB", "GFN1-xTB"):
        result = runner.invoke(
            app,
            [
                "label",
                str(path),
                str(tmp_path / f"{method}.extxyz"),
                "--adapter",
                "tblite",
                "--set",
                f"method={method}",
            ],
        )
        assert result.exit_code == 0, result.output
    mixed = read(str(tmp_path / "GFN2-xTB.extxyz"), index=":3") + read(str(tmp_path / "GFN1-xTB.extxyz"), index=":3")
    write(str(tmp_path / "mixed.extxyz"), mixed, format="extxyz")
    result = runner.invoke(
        app, ["train", str(tmp_path / "mixed.extxyz"), "-o", str(tmp_path / "m.pt"), "--epochs", "1"]
    )
    assert result.exit_code != 0
    assert "different levels of theory" in result.output
