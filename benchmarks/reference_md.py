"""An independent test set from reference-driven Langevin MD: frames no campaign chose.

A campaign's own test set is rattled copies of its starting structure (``bootstrap.n_test``);
it says little about the configurations MD actually visits. This script runs Langevin MD on
the reference method itself (ASE's ``Langevin`` with tblite's ASE calculator, at the
campaign's exploration temperature and time step unless told otherwise) from the campaign's
starting structure, discards an equilibration stretch, then keeps one frame every
``--every`` steps (50 fs at the defaults: many O-H stretch periods of ~9 fs and a few
water librations apart, so the forces of successive frames are nearly independent). Each kept frame is labelled again with ionflow's own tblite adapter, the
code path and settings (``reference.settings``) of the campaign's labels, so the test labels
are the campaign's labels of those geometries.

Output: an extxyz file that ``ionflow evaluate`` and ``ionflow train`` read, with ``REF_energy``
(eV), ``REF_forces`` (eV/Å), ``REF_dipole`` (e·Å, about the frame's origin, as the adapters
give it) and ``REF_charges`` (e, Mulliken), and in each frame's info ``charge``,
``multiplicity``, ``md_step``, ``time_fs``, ``temperature_K`` (the thermostat's) and ``seed``.

Units: Å, eV, fs, K. Seeded (velocities and the Langevin noise), so a run is reproducible.

Usage:
    python benchmarks/reference_md.py examples/nacl-water.yaml -o examples/data/nacl-water-md300K.extxyz \
        [--frames 50] [--every 100] [--equilibrate 2000] [--temperature K] [--timestep fs] [--seed 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

from ionflow.config import CampaignConfig, load_config
from ionflow.dft_adapters import get_adapter
from ionflow.platform.structures import charge_of, closest_contact, labelled_copy, multiplicity_of, write_extxyz

#: Closest contact (Å) below which the reference MD has blown up (no frame is kept then).
MIN_CONTACT = 0.6


def reference_calculator(cfg: CampaignConfig, atoms: Atoms):
    """tblite's ASE calculator with the campaign's reference settings, for ``atoms``' charge state."""
    from tblite.ase import TBLite

    if cfg.reference.adapter != "tblite":
        raise SystemExit(f"reference MD runs tblite; this campaign labels with {cfg.reference.adapter}")
    s = cfg.reference.settings
    return TBLite(
        method=s["method"],
        accuracy=s["accuracy"],
        max_iterations=s["max_iterations"],
        electronic_temperature=s["electronic_temperature"],  # K in tblite's ASE calculator
        charge=charge_of(atoms),
        multiplicity=multiplicity_of(atoms),
        verbosity=0,
    )


def label_frames(cfg: CampaignConfig, frames: list[Atoms]) -> list[Atoms]:
    """``frames`` labelled by ionflow's adapter with the campaign's reference settings (``REF_*`` keys)."""
    adapter = get_adapter(cfg.reference.adapter, cfg.reference.settings)
    out = []
    for atoms, result in zip(frames, adapter.label(frames)):
        if not result.ok:
            raise RuntimeError(f"reference calculation failed (md_step {atoms.info.get('md_step')}): {result.error}")
        out.append(labelled_copy(atoms, result.energy, result.forces, dipole=result.dipole, charges=result.charges))
    return out


def reference_md(
    cfg: CampaignConfig,
    n_frames: int,
    every: int,
    equilibrate: int,
    temperature_K: float,
    timestep_fs: float,
    friction_per_fs: float,
    seed: int,
    start: Atoms | None = None,
) -> list[Atoms]:
    """Langevin MD on the reference; ``n_frames`` frames, one every ``every`` steps after ``equilibrate``."""
    atoms = (start if start is not None else cfg.system.atoms()).copy()
    atoms.calc = reference_calculator(cfg, atoms)
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)  # a free cluster: no drift, no spin of the whole
    ZeroRotation(atoms)
    atoms.set_constraint(FixCom())
    dyn = Langevin(
        atoms,
        timestep=timestep_fs * units.fs,
        temperature_K=temperature_K,
        friction=friction_per_fs / units.fs,
        fixcm=False,  # the centre of mass is held by FixCom instead (ASE's advice)
        rng=rng,
    )
    dyn.run(equilibrate)
    frames = []
    for k in range(n_frames):
        dyn.run(every)
        step = equilibrate + (k + 1) * every
        frame = Atoms(atoms.numbers, atoms.positions)  # positions only: no momenta, no constraint
        frame.info.update(
            charge=charge_of(atoms),
            multiplicity=multiplicity_of(atoms),
            md_step=step,
            time_fs=step * timestep_fs,
            temperature_K=temperature_K,
            seed=seed,
        )
        contact = closest_contact(frame)[0]
        if contact < MIN_CONTACT:
            raise RuntimeError(f"reference MD blew up: atoms {contact:.2f} Å apart at step {step}")
        frames.append(frame)
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("campaign", type=Path, help="Campaign file: system, reference and explore settings.")
    parser.add_argument("-o", "--output", type=Path, required=True, help="extxyz file to write.")
    parser.add_argument("--frames", type=int, default=50, help="Frames to keep.")
    parser.add_argument("--every", type=int, default=100, help="MD steps between kept frames.")
    parser.add_argument("--equilibrate", type=int, default=2000, help="MD steps discarded first.")
    parser.add_argument("--temperature", type=float, default=None, help="K; default: explore.temperature_K.")
    parser.add_argument("--timestep", type=float, default=None, help="fs; default: explore.timestep_fs.")
    parser.add_argument("--friction", type=float, default=None, help="1/fs; default: explore.friction_per_fs.")
    parser.add_argument("--seed", type=int, default=1, help="Seed of the velocities and the Langevin noise.")
    args = parser.parse_args()

    cfg = load_config(args.campaign)
    temperature = args.temperature or cfg.explore.temperature_K
    timestep = args.timestep or cfg.explore.timestep_fs
    friction = args.friction or cfg.explore.friction_per_fs
    t0 = time.perf_counter()
    frames = reference_md(cfg, args.frames, args.every, args.equilibrate, temperature, timestep, friction, args.seed)
    t_md = time.perf_counter() - t0
    labelled = label_frames(cfg, frames)
    write_extxyz(args.output, labelled)
    energies = np.array([a.info["REF_energy"] for a in labelled])
    forces = np.concatenate([a.arrays["REF_forces"] for a in labelled])
    print(
        f"{args.output}: {len(labelled)} frames of {cfg.system.atoms().get_chemical_formula()} "
        f"({temperature:g} K, {timestep:g} fs, every {args.every} steps after {args.equilibrate}; seed {args.seed}); "
        f"MD {t_md:.0f} s, labels {time.perf_counter() - t0 - t_md:.1f} s"
    )
    print(
        f"  energy spread {1000 * energies.std() / len(labelled[0]):.1f} meV/atom, "
        f"force RMS {np.sqrt(np.mean(forces**2)):.3f} eV/Å"
    )


if __name__ == "__main__":
    main()
