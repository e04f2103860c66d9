"""Is a campaign's final model fit for MD? Energy drift in NVE, and time to failure in hot Langevin MD.

The model (an ionflow model file, e.g. the final model of ``benchmarks/active_learning.py``'s
uncertainty campaign with seed 0) drives ASE's integrators through ionflow's own
``EnsembleCalculator`` (the committee mean, as in the campaign's exploration).

1. NVE (velocity Verlet, ``--timestep`` fs) from the first frame of the reference-MD test set
   (``benchmarks/reference_md.py``) with Maxwell-Boltzmann velocities at the campaign's
   temperature, centre-of-mass motion and rotation removed, for ``--nve-ps`` ps. The total
   energy is recorded every ``RECORD_EVERY`` steps; the drift is the slope of a least-squares
   line through it, in meV/atom/ps (goal: below 1).
2. Langevin MD (ASE's ``Langevin``, the integrator of ionflow's explore step, with the
   campaign's friction) at ``--hot`` x the campaign's temperature (default 1.5x), for up to
   ``--ps`` ps or ``--wall`` s, whichever comes first. It fails at the first of:
     - a blow-up: a non-finite energy, force or position, two atoms closer than
       ``MIN_CONTACT`` Å, or a force above ``MAX_FORCE`` eV/Å on any atom (10x the largest
       force in GFN2-xTB MD of NaCl(H2O)3: 3.4 eV/Å at 300 K, 4.9 eV/Å at 450 K);
     - a frame the reference disagrees with: every ``--check-fs`` fs, and at once whenever
       the covalent bond pattern changes (pairs closer than ``BOND_FACTOR`` x the sum of
       covalent radii, alkali and alkaline-earth ions left out), the frame is labelled with the
       campaign's reference (tblite, through ionflow's adapter). It fails when the model's
       force RMSE on the frame is above ``FORCE_FACTOR`` x the model's force RMSE on the
       whole test set, or its energy error per atom above ``ENERGY_FACTOR`` x its test energy
       RMSE (the energy error of one frame scatters like the test set's errors, so 5 RMSEs is
       a ~1e-6 chance per check for Gaussian errors, against ~3e-3 for 3; a frame's force
       RMSE averages 3N components and scatters much less, so 3x is already an outlier).
   A change of bond pattern alone is not a failure (a proton may move, a water may leave);
   the reference decides whether the model is still right there.

Units: Å, eV, fs, K; drift meV/atom/ps. Usage:
    python benchmarks/md_stability.py MODEL [--campaign examples/nacl-water.yaml]
        [--test examples/data/nacl-water-md300K.extxyz] [--nve-ps 2] [--ps 100] [--wall 1800]
        [--hot 1.5] [--timestep 0.5] [--check-fs 500] [--until-blowup] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.data import covalent_radii
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.md.verlet import VelocityVerlet

sys.path.insert(0, str(Path(__file__).parent))
from reference_md import label_frames  # noqa: E402

from ionflow.config import load_config  # noqa: E402
from ionflow.platform.evaluation import evaluate  # noqa: E402
from ionflow.platform.model import load_model  # noqa: E402
from ionflow.platform.model.calculator import EnsembleCalculator  # noqa: E402
from ionflow.platform.structures import closest_contact, read_structures, with_reference_labels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: Closest contact (Å) below which the MD has blown up.
MIN_CONTACT = 0.6
#: Largest force (eV/Å) on any atom before the MD counts as blown up.
MAX_FORCE = 50.0
#: Pairs closer than this x the sum of their covalent radii are bonded (1.3 takes O-H up to 1.3 Å).
BOND_FACTOR = 1.3
#: Alkali and alkaline-earth metals: their ions bind to neighbours ionically, not covalently, and
#: their contacts (Na-O, Na-Cl) breathe across any covalent cutoff at 450 K, so they are left out.
IONIC = frozenset({3, 4, 11, 12, 19, 20, 37, 38, 55, 56})
#: A frame fails the reference check above these multiples of the model's test-set RMSEs.
FORCE_FACTOR = 3.0
ENERGY_FACTOR = 5.0
#: Steps between records of the NVE total energy.
RECORD_EVERY = 10


def bonds(atoms: Atoms) -> frozenset[tuple[int, int]]:
    """Covalent bonds: pairs (i < j) of non-``IONIC`` atoms closer than ``BOND_FACTOR`` x the sum
    of their covalent radii (O-H in water; an H-Cl bond would be a proton moved to the anion)."""
    d = atoms.get_all_distances()
    r = covalent_radii[atoms.numbers]
    covalent = ~np.isin(atoms.numbers, list(IONIC))
    close = (d < BOND_FACTOR * (r[:, None] + r[None, :])) & covalent[:, None] & covalent[None, :]
    i, j = np.nonzero(np.triu(close, 1))
    return frozenset(zip(i.tolist(), j.tolist()))


def bond_names(atoms: Atoms, pairs: frozenset[tuple[int, int]]) -> list[str]:
    """Bonds as ``O2-H3`` (symbol and index of each atom)."""
    symbols = atoms.get_chemical_symbols()
    return [f"{symbols[i]}{i}-{symbols[j]}{j}" for i, j in sorted(pairs)]


def prepared(start: Atoms, calc: EnsembleCalculator, temperature_K: float, seed: int) -> Atoms:
    atoms = start.copy()
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.set_constraint(FixCom())
    return atoms


def nve_drift(start: Atoms, calc: EnsembleCalculator, temperature_K: float, timestep_fs: float, ps: float, seed: int):
    """Total energy drift (meV/atom/ps, slope of a linear fit) of velocity-Verlet MD, and its record."""
    atoms = prepared(start, calc, temperature_K, seed)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    n_records = int(round(ps * 1000 / timestep_fs / RECORD_EVERY))
    times, energies, temps = [], [], []
    for k in range(n_records + 1):
        if k:
            dyn.run(RECORD_EVERY)
        times.append(k * RECORD_EVERY * timestep_fs / 1000)  # ps
        energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        temps.append(atoms.get_temperature())
    times, energies = np.array(times), np.array(energies)
    slope = np.polyfit(times, energies, 1)[0]  # eV/ps
    return {
        "ps": float(times[-1]),
        "drift_meV_per_atom_ps": float(1000 * slope / len(atoms)),
        "energy_std_meV_per_atom": float(1000 * energies.std() / len(atoms)),
        "max_excursion_meV_per_atom": float(1000 * np.abs(energies - energies[0]).max() / len(atoms)),
        "mean_temperature_K": float(np.mean(temps)),
        "finite": bool(np.isfinite(energies).all()),
    }


def reference_check(cfg, atoms: Atoms, calc: EnsembleCalculator, limits: dict) -> dict:
    """The model against the reference on one frame: force RMSE (eV/Å), |ΔE| per atom (eV)."""
    frame = atoms.copy()
    frame.calc = None
    ref = label_frames(cfg, [frame])[0]
    f_model = calc.get_forces(atoms)
    e_model = calc.get_potential_energy(atoms)
    f_rmse = float(np.sqrt(np.mean((f_model - ref.arrays["REF_forces"]) ** 2)))
    de = float(abs(e_model - ref.info["REF_energy"]) / len(atoms))
    failed = f_rmse > limits["forces"] or de > limits["energy"]
    return {"forces_rmse": f_rmse, "energy_error_per_atom": de, "failed": bool(failed)}


def langevin_failure(
    cfg,
    start: Atoms,
    calc,
    temperature_K: float,
    timestep_fs: float,
    ps: float,
    wall_s: float,
    check_fs: float,
    seed: int,
    limits: dict,
    until_blowup: bool = False,
) -> dict:
    """Run hot Langevin MD until failure, ``ps`` ps or ``wall_s`` s; say when and why it stopped.

    With ``until_blowup``, a frame the reference disagrees with is recorded (the first one's time
    is ``first_disagreement_ps``) but only a blow-up stops the run."""
    atoms = prepared(start, calc, temperature_K, seed)
    dyn = Langevin(
        atoms,
        timestep=timestep_fs * units.fs,
        temperature_K=temperature_K,
        friction=cfg.explore.friction_per_fs / units.fs,
        fixcm=False,  # the centre of mass is held by FixCom instead (ASE's advice)
        rng=np.random.default_rng(seed + 1),
    )
    check_every = max(1, int(round(check_fs / timestep_fs)))
    n_steps = int(round(ps * 1000 / timestep_fs))
    pattern = bonds(atoms)
    checks, pattern_changes, temps = [], 0, []
    t0 = time.perf_counter()
    failure, step, first_disagreement = None, 0, None
    while step < n_steps and time.perf_counter() - t0 < wall_s:
        dyn.run(1)
        step += 1
        forces = atoms.get_forces()
        energy = atoms.get_potential_energy()
        if not (np.isfinite(forces).all() and np.isfinite(energy) and np.isfinite(atoms.positions).all()):
            failure = "non-finite energy, forces or positions"
        elif (contact := closest_contact(atoms)[0]) < MIN_CONTACT:
            failure = f"atoms {contact:.2f} Å apart"
        elif (fmax := np.linalg.norm(forces, axis=1).max()) > MAX_FORCE:
            failure = f"force {fmax:.1f} eV/Å"
        else:
            new_pattern = bonds(atoms)
            changed = new_pattern != pattern
            check = {"step": step, "ps": step * timestep_fs / 1000, "bond_change": changed}
            if changed:
                pattern_changes += 1
                check.update(
                    formed=bond_names(atoms, new_pattern - pattern), broken=bond_names(atoms, pattern - new_pattern)
                )
                pattern = new_pattern
            if changed or step % check_every == 0:
                check.update(reference_check(cfg, atoms, calc, limits))
                checks.append(check)
                if check["failed"] and first_disagreement is None:
                    first_disagreement = check["ps"]
                if check["failed"] and not until_blowup:
                    failure = (
                        f"reference disagrees: force RMSE {check['forces_rmse']:.3f} eV/Å, "
                        f"|ΔE| {1000 * check['energy_error_per_atom']:.1f} meV/atom"
                    )
        if step % 100 == 0:
            temps.append(atoms.get_temperature())
        if failure:
            break
    return {
        "temperature_K": temperature_K,
        "ps_run": step * timestep_fs / 1000,
        "ps_asked": ps,
        "wall_s": time.perf_counter() - t0,
        "failure": failure,
        "first_disagreement_ps": first_disagreement,
        "disagreements": sum(c["failed"] for c in checks),
        "mean_temperature_K": float(np.mean(temps)) if temps else None,
        "bond_pattern_changes": pattern_changes,
        "checks": len(checks),
        "max_check_forces_rmse": max((c["forces_rmse"] for c in checks), default=None),
        "max_check_energy_error_per_atom": max((c["energy_error_per_atom"] for c in checks), default=None),
        "check_log": checks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="ionflow model file (.pt).")
    parser.add_argument("--campaign", type=Path, default=ROOT / "examples/nacl-water.yaml")
    parser.add_argument("--test", type=Path, default=ROOT / "examples/data/nacl-water-md300K.extxyz")
    parser.add_argument("--nve-ps", type=float, default=2.0, help="Length of the NVE run, ps.")
    parser.add_argument("--ps", type=float, default=100.0, help="Longest hot Langevin run, ps.")
    parser.add_argument("--wall", type=float, default=1800.0, help="Wall-clock cap of the Langevin run, s.")
    parser.add_argument("--hot", type=float, default=1.5, help="Langevin temperature / campaign temperature.")
    parser.add_argument("--timestep", type=float, default=None, help="fs; default: the campaign's explore.timestep_fs.")
    parser.add_argument("--check-fs", type=float, default=500.0, help="fs between reference checks.")
    parser.add_argument(
        "--until-blowup", action="store_true", help="Log frames the reference disagrees with; stop only at a blow-up."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()

    cfg = load_config(args.campaign)
    timestep = args.timestep or cfg.explore.timestep_fs
    ensemble = load_model(args.model)
    calc = EnsembleCalculator(ensemble)
    test = [with_reference_labels(a) for a in read_structures(args.test)]
    metrics = evaluate(ensemble, test)
    limits = {"forces": FORCE_FACTOR * metrics["forces_rmse"], "energy": ENERGY_FACTOR * metrics["energy_rmse"]}
    print(
        f"model {args.model}: test force RMSE {metrics['forces_rmse']:.3f} eV/Å, energy RMSE "
        f"{1000 * metrics['energy_rmse']:.2f} meV/atom -> check limits {limits['forces']:.3f} eV/Å, "
        f"{1000 * limits['energy']:.2f} meV/atom",
        flush=True,
    )
    t0 = time.perf_counter()
    nve = nve_drift(test[0], calc, cfg.explore.temperature_K, timestep, args.nve_ps, args.seed)
    nve["wall_s"] = time.perf_counter() - t0
    print(f"NVE: {json.dumps(nve)}", flush=True)
    hot = langevin_failure(
        cfg,
        test[0],
        calc,
        args.hot * cfg.explore.temperature_K,
        timestep,
        args.ps,
        args.wall,
        args.check_fs,
        args.seed,
        limits,
        args.until_blowup,
    )
    shown = {k: v for k, v in hot.items() if k != "check_log"}
    print(f"Langevin: {json.dumps(shown)}", flush=True)
    if hot["failure"]:
        print(f"failure after {hot['ps_run']:.2f} ps: {hot['failure']}")
    else:
        print(f"no failure in {hot['ps_run']:.2f} ps")
    if hot["first_disagreement_ps"] is not None:
        print(f"first frame the reference disagrees with at {hot['first_disagreement_ps']:.3f} ps")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"model": str(args.model), "test_metrics": metrics, "limits": limits, "nve": nve, "langevin": hot},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
