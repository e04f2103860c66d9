"""Labels saved by a foundation model and by a zero-shot start: real campaigns, three arms.

The campaign labels at GFN2-xTB; its foundation is trained at another level of theory, as a real
user's would be: GFN1-xTB (tblite). The foundation is made here, with mace-torch itself (nothing
is downloaded): GFN1-xTB Langevin MD of the campaign's system (``FOUNDATION_MD``: trajectories at
300-400 K, one frame every 10 fs after an equilibration) plus rattled copies of its minimum,
every frame labelled again by ionflow's tblite adapter at GFN1-xTB; a ``ScaleShiftMACE`` of the
architecture ``ARCH`` (the active-learning benchmark's: 8x0e+8x1o, 2 layers, r_max 4 Å) trained
on them. Its GFN1-xTB error is measured on a held-out trajectory (another seed), its error
against the campaign's labels on the GFN2-xTB test set, and its own stability in Langevin MD
(ionflow's zero-shot ensemble, ``explore.walkers`` walkers, ``MD_STEPS`` steps at
``explore.temperature_K``). The foundation file and its data are cached in ``--out/foundation``.

Arms, each a real campaign through ``campaign_flow`` with the active-learning benchmark's
settings (``benchmarks/active_learning.py``: ``BENCHMARK_CHANGES``, the ``uncertainty``
strategy, 5 iterations of 6 labels after 6 bootstrap labels), identical but for:

- ``scratch``: no foundation, rattled bootstrap (the active-learning benchmark's baseline);
- ``finetune``: ``model.foundation`` set, rattled bootstrap;
- ``zero_shot``: ``model.foundation`` set, ``bootstrap.source: foundation_md`` (``MD_STEPS`` steps).

Every model version is evaluated on the independent GFN2-xTB test set (default
``examples/data/nacl-water-md300K.extxyz``) against the training labels it was fitted on, as in
the active-learning benchmark, whose mean curves and interpolation (``labels_to_reach``) give the
labels saved: for each N of the baseline arm, the fewest labels at which the other arm's mean
curve is at or below the baseline's mean error at N.

Outputs in ``--out`` (default ``/tmp/ionflow-zero-shot``): ``foundation/`` (model file, data,
``foundation.json``), the campaign files and folders, ``results.json``; tables go to stdout.
``--report`` re-prints them from ``results.json``.

Usage:
    python benchmarks/zero_shot.py [--seeds 0 1] [--arms scratch finetune zero_shot] [--out DIR]
        [--campaign examples/nacl-water.yaml] [--test examples/data/nacl-water-md300K.extxyz]
        [--quick] [--report]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# active_learning sets up a private Prefect home before anything imports prefect
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from active_learning import (  # noqa: E402
    BENCHMARK_CHANGES,
    QUICK_CHANGES,
    ROOT,
    labels_to_reach,
    mean_curve,
    merged,
    print_curves,
    run_campaign,
)

ARMS = ("scratch", "finetune", "zero_shot")

#: The foundation's architecture, which every arm uses (a foundation fixes it; the scratch arm is
#: given the same): the active-learning benchmark's model, and ionflow's defaults for the rest.
ARCH = {
    "r_max": 4.0,
    "num_interactions": 2,
    "hidden_irreps": "8x0e+8x1o",
    "mlp_irreps": "8x0e",
    "max_ell": 2,
    "correlation": 2,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
}
#: The foundation's elements (its one-hot order): H, O, Na, Cl.
Z_TABLE = [1, 8, 11, 17]
#: The foundation's level of theory (the campaign labels at GFN2-xTB).
FOUNDATION_METHOD = "GFN1-xTB"
#: GFN1-xTB Langevin trajectories (temperature K, seed, frames kept), 0.5 fs steps, one frame
#: every 20 steps after 1000 steps of equilibration; and the held-out one.
FOUNDATION_MD = [(300.0, 11, 150), (350.0, 12, 150), (400.0, 13, 150)]
HELD_OUT_MD = (300.0, 14, 50)
MD_EVERY, MD_EQUILIBRATE, MD_TIMESTEP_FS = 20, 1000, 0.5
#: Rattled copies of the minimum added to the foundation's data (count, stdev Å, seed).
FOUNDATION_RATTLES = (60, 0.08, 21)
#: Pretraining: epochs, batch size, Adam learning rate (cosine-decayed to 1 %), energy weight (eV/atom)^-2.
PRETRAIN = {"epochs": 100, "batch": 16, "lr": 1e-2, "energy_weight": 20.0}
#: Zero-shot bootstrap MD steps per walker (explore.timestep_fs each).
MD_STEPS = 400

QUICK_FOUNDATION = {"md": [(350.0, 11, 30)], "held_out": (300.0, 14, 10), "rattles": (10, 0.08, 21), "epochs": 5}


# -- the foundation -------------------------------------------------------------------------------


def gfn1_config(base: dict, folder: Path):
    """The campaign's config with the foundation's level of theory as its reference."""
    from ionflow.config import load_config

    config = merged(base, {"reference": {"adapter": "tblite", "settings": {"method": FOUNDATION_METHOD}}})
    config.pop("workdir", None)
    path = folder / "gfn1-campaign.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return load_config(path)


def foundation_data(cfg, md: list, rattles: tuple) -> list:
    """GFN1-xTB MD frames and rattles of the campaign's system, labelled at GFN1-xTB."""
    from reference_md import label_frames, reference_md

    from ionflow.platform.structures import rattled, with_charge_state

    frames = []
    for temperature, seed, n in md:
        frames += reference_md(
            cfg, n, MD_EVERY, MD_EQUILIBRATE, temperature, MD_TIMESTEP_FS, cfg.explore.friction_per_fs, seed
        )
    if rattles[0]:
        start = cfg.system.atoms()
        frames += [with_charge_state(a, cfg.system.charge, cfg.system.multiplicity) for a in rattled(start, *rattles)]
    return label_frames(cfg, frames)


def _arrays(frames: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    energies = np.array([a.info["REF_energy"] for a in frames])
    forces = np.concatenate([a.arrays["REF_forces"] for a in frames])
    counts = np.array([[np.sum(a.numbers == z) for z in Z_TABLE] for a in frames], dtype=float)
    return energies, forces, counts


def build_model(frames: list):
    """A ScaleShiftMACE of ``ARCH`` for ``frames``: E0 by least squares (minimum norm: every frame
    has the same composition), scale the force RMS, the mean neighbour count within r_max."""
    import mace  # noqa: F401  (before e3nn)
    import torch
    from e3nn import o3
    from mace.modules import RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock, ScaleShiftMACE

    energies, forces, counts = _arrays(frames)
    e0 = np.linalg.lstsq(counts, energies, rcond=None)[0]
    neighbours = [
        (np.count_nonzero(np.linalg.norm(a.positions[:, None] - a.positions[None], axis=-1) < ARCH["r_max"]) - len(a))
        / len(a)
        for a in frames
    ]
    return ScaleShiftMACE(
        r_max=ARCH["r_max"],
        num_bessel=ARCH["num_bessel"],
        num_polynomial_cutoff=ARCH["num_polynomial_cutoff"],
        max_ell=ARCH["max_ell"],
        interaction_cls=RealAgnosticResidualInteractionBlock,
        interaction_cls_first=RealAgnosticInteractionBlock,
        num_interactions=ARCH["num_interactions"],
        num_elements=len(Z_TABLE),
        hidden_irreps=o3.Irreps(ARCH["hidden_irreps"]),
        MLP_irreps=o3.Irreps(ARCH["mlp_irreps"]),
        atomic_energies=e0,
        avg_num_neighbors=float(np.mean(neighbours)),
        atomic_numbers=Z_TABLE,
        correlation=ARCH["correlation"],
        gate=torch.nn.functional.silu,
        atomic_inter_scale=float(np.sqrt(np.mean(forces**2))),
        atomic_inter_shift=0.0,
        use_reduced_cg=False,
    )


def predict(model, frames: list) -> tuple[np.ndarray, np.ndarray]:
    """Energies (eV) and forces (eV/Å) of ``frames`` from a mace ``model`` (float64)."""
    import torch

    from ionflow.platform.model.graph import build_batch

    energies, forces = [], []
    for start in range(0, len(frames), 32):
        chunk = frames[start : start + 32]
        out = model(build_batch(chunk, Z_TABLE, ARCH["r_max"], dtype=torch.float64), training=False, compute_force=True)
        energies.append(out["energy"].detach().numpy())
        forces.append(out["forces"].detach().numpy())
    return np.concatenate(energies), np.concatenate(forces)


def errors(model, frames: list) -> dict:
    """Force RMSE (eV/Å), energy RMSE (meV/atom) and the same after removing the mean energy offset."""
    e_pred, f_pred = predict(model, frames)
    energies, forces, _ = _arrays(frames)
    n = np.array([len(a) for a in frames])
    de = (e_pred - energies) / n
    return {
        "forces_rmse": float(np.sqrt(np.mean((f_pred - forces) ** 2))),
        "energy_rmse_meV": float(1000 * np.sqrt(np.mean(de**2))),
        "energy_rmse_offset_removed_meV": float(1000 * np.std(de)),
        "force_rms": float(np.sqrt(np.mean(forces**2))),
    }


def pretrain(frames: list, epochs: int) -> object:
    """Train a ScaleShiftMACE on ``frames``: Adam, cosine learning rate, energy + force loss."""
    import torch

    from ionflow.platform.model.graph import build_batch

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # mace builds its layers in torch's default dtype
    try:
        torch.manual_seed(0)
        model = build_model(frames)
        optimiser = torch.optim.Adam(model.parameters(), lr=PRETRAIN["lr"])
        steps = epochs * int(np.ceil(len(frames) / PRETRAIN["batch"]))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=PRETRAIN["lr"] / 100)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            order = rng.permutation(len(frames))
            total = 0.0
            for start in range(0, len(order), PRETRAIN["batch"]):
                chunk = [frames[i] for i in order[start : start + PRETRAIN["batch"]]]
                batch = build_batch(chunk, Z_TABLE, ARCH["r_max"], dtype=torch.float64)
                out = model(batch, training=True, compute_force=True)
                n = torch.tensor([len(a) for a in chunk], dtype=torch.float64)
                ref_e = torch.tensor([a.info["REF_energy"] for a in chunk])
                ref_f = torch.tensor(np.concatenate([a.arrays["REF_forces"] for a in chunk]))
                loss = (
                    PRETRAIN["energy_weight"] * (((out["energy"] - ref_e) / n) ** 2).mean()
                    + ((out["forces"] - ref_f) ** 2).mean()
                )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                total += float(loss.detach()) * len(chunk)
            if epoch % 10 == 0 or epoch == epochs - 1:
                print(
                    f"  pretraining epoch {epoch + 1}/{epochs}: loss {total / len(frames):.4f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    finally:
        torch.set_default_dtype(dtype)
    return model.eval()


def stability(path: Path, cfg, steps: int) -> dict:
    """The foundation alone (ionflow's zero-shot ensemble) in Langevin MD: walkers from rattled
    starts at the campaign's temperature; stop reasons, closest contact, Na-Cl and largest distances."""
    from ionflow.config import ModelConfig
    from ionflow.platform.finetune import zero_shot
    from ionflow.platform.md import run_walkers
    from ionflow.platform.model.foundation import read_foundation
    from ionflow.platform.structures import closest_contact, rattled, with_charge_state

    ensemble = zero_shot(read_foundation(path), ModelConfig(**ARCH).settings())
    starts = [
        with_charge_state(a, cfg.system.charge, cfg.system.multiplicity)
        for a in rattled(cfg.system.atoms(), cfg.explore.walkers, cfg.explore.start_rattle_stdev, seed=5)
    ]
    t0 = time.perf_counter()
    runs = run_walkers(
        ensemble,
        starts,
        steps=steps,
        timestep_fs=cfg.explore.timestep_fs,
        temperature_K=cfg.explore.temperature_K,
        friction_per_fs=cfg.explore.friction_per_fs,
        sample_every=10,
        stop_uncertainty=float("inf"),
        seed=5,
    )
    frames = [f for run in runs for f in run.frames]
    na, cl = [int(np.flatnonzero(frames[0].numbers == z)[0]) for z in (11, 17)] if frames else (0, 1)
    return {
        "walkers": len(runs),
        "steps": steps,
        "temperature_K": cfg.explore.temperature_K,
        "stop_reasons": [run.stop_reason for run in runs],
        "steps_done": [run.n_steps_done for run in runs],
        "closest_contact_min": float(min(closest_contact(f)[0] for f in frames)) if frames else None,
        "na_cl_range": [
            float(min(f.get_distance(na, cl) for f in frames)),
            float(max(f.get_distance(na, cl) for f in frames)),
        ]
        if frames
        else None,
        "largest_distance_max": float(max(f.get_all_distances().max() for f in frames)) if frames else None,
        "wall_s": time.perf_counter() - t0,
    }


def make_foundation(base: dict, out: Path, test_frames: list, quick: bool) -> tuple[Path, dict]:
    """The foundation file and its record (data, errors, stability); cached in ``out/foundation``."""
    import torch

    from ionflow.platform.structures import read_structures, with_reference_labels, write_extxyz

    folder = out / "foundation"
    folder.mkdir(parents=True, exist_ok=True)
    path, record_path = folder / "foundation.model", folder / "foundation.json"
    if path.is_file() and record_path.is_file():
        print(f"foundation: cached {path}", flush=True)
        return path, json.loads(record_path.read_text())
    cfg = gfn1_config(base, folder)
    md = QUICK_FOUNDATION["md"] if quick else FOUNDATION_MD
    held_md = QUICK_FOUNDATION["held_out"] if quick else HELD_OUT_MD
    rattles = QUICK_FOUNDATION["rattles"] if quick else FOUNDATION_RATTLES
    epochs = QUICK_FOUNDATION["epochs"] if quick else PRETRAIN["epochs"]
    data_path, held_path = folder / "gfn1-train.extxyz", folder / "gfn1-held-out.extxyz"
    t0 = time.perf_counter()
    if data_path.is_file() and held_path.is_file():
        train = [with_reference_labels(a) for a in read_structures(data_path)]
        held = [with_reference_labels(a) for a in read_structures(held_path)]
    else:
        train = foundation_data(cfg, md, rattles)
        held = foundation_data(cfg, [held_md], (0, 0.0, 0))
        write_extxyz(data_path, train)
        write_extxyz(held_path, held)
    t_data = time.perf_counter() - t0
    print(f"foundation data: {len(train)} + {len(held)} held-out GFN1-xTB frames ({t_data:.0f} s)", flush=True)
    t0 = time.perf_counter()
    model = pretrain(train, epochs)
    t_train = time.perf_counter() - t0
    torch.save(model, path)
    record = {
        "method": FOUNDATION_METHOD,
        "architecture": ARCH,
        "z_table": Z_TABLE,
        "md": md,
        "held_out_md": held_md,
        "md_every": MD_EVERY,
        "md_equilibrate": MD_EQUILIBRATE,
        "md_timestep_fs": MD_TIMESTEP_FS,
        "rattles": rattles,
        "pretrain": {**PRETRAIN, "epochs": epochs},
        "n_train": len(train),
        "n_held_out": len(held),
        "data_s": t_data,
        "pretrain_s": t_train,
        "train_errors_gfn1": errors(model, train),
        "held_out_errors_gfn1": errors(model, held),
        "test_errors_gfn2": errors(model, test_frames),
    }
    record["stability"] = stability(path, cfg, 60 if quick else MD_STEPS)
    record_path.write_text(json.dumps(record, indent=1))
    return path, record


# -- the campaigns --------------------------------------------------------------------------------


def campaign_file(base: dict, arm: str, seed: int, out: Path, foundation: Path, quick: bool) -> Path:
    """Write the campaign file of one (arm, seed) run; return its path."""
    config = merged(merged(base, BENCHMARK_CHANGES), {"model": ARCH, "selection": {"strategy": "uncertainty"}})
    if quick:
        config = merged(config, QUICK_CHANGES)
    if arm != "scratch":
        config = merged(config, {"model": {"foundation": str(foundation)}})
    if arm == "zero_shot":
        config = merged(config, {"bootstrap": {"source": "foundation_md", "md_steps": 40 if quick else MD_STEPS}})
    name = f"zs-{arm}-s{seed}"
    config = merged(config, {"name": name, "seed": seed, "workdir": str(out / "runs")})
    path = out / "campaigns" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bootstrap_origins(path: Path) -> dict:
    """The campaign's bootstrap training structures: how many came from MD (an md_step) and how
    many from rattles, and the Na-Cl distances (Å) of each kind."""
    from ase.io import read

    from ionflow.config import load_config

    cfg = load_config(path)
    folder = cfg.campaign_dir
    with sqlite3.connect(folder / "ionflow.db") as db:
        rows = db.execute(
            "select s.path, cs.md_step from campaign_structure cs join structure s on s.id = cs.structure_id "
            "where cs.origin = 'initial'"
        ).fetchall()
    na_cl = {"md": [], "rattle": []}
    for relpath, step in rows:
        atoms = read(str(folder / relpath))
        na, cl = [int(np.flatnonzero(atoms.numbers == z)[0]) for z in (11, 17)]
        na_cl["rattle" if step is None else "md"].append(round(float(atoms.get_distance(na, cl)), 3))
    return {
        "from_md": len(na_cl["md"]),
        "from_rattle": len(na_cl["rattle"]),
        "md_steps": sorted(int(s) for _, s in rows if s is not None),
        "na_cl": na_cl,
    }


# -- the report -----------------------------------------------------------------------------------


def report(results: dict) -> None:
    f = results.get("foundation")
    if f:
        h, t, s = f["held_out_errors_gfn1"], f["test_errors_gfn2"], f["stability"]
        print(
            f"\nFoundation ({f['method']}, {f['n_train']} frames, {f['pretrain']['epochs']} epochs in "
            f"{f['pretrain_s']:.0f} s; data {f['data_s']:.0f} s):\n"
        )
        print("| set | frames | force RMS (eV/Å) | F RMSE (eV/Å) | E RMSE (meV/atom) | E RMSE, offset removed |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, e, n in (
            (f"{f['method']} training", f["train_errors_gfn1"], f["n_train"]),
            (f"{f['method']} held-out MD", h, f["n_held_out"]),
            ("GFN2-xTB test set (the campaign's labels)", t, results["n_test"]),
        ):
            print(
                f"| {label} | {n} | {e['force_rms']:.3f} | {e['forces_rmse']:.3f} | {e['energy_rmse_meV']:.2f} | "
                f"{e['energy_rmse_offset_removed_meV']:.2f} |"
            )
        print(
            f"\nFoundation MD ({s['walkers']} walkers x {s['steps']} steps at {s['temperature_K']:g} K): stop reasons "
            f"{s['stop_reasons']}, closest contact {s['closest_contact_min']:.2f} Å, Na-Cl "
            f"{s['na_cl_range'][0]:.2f}-{s['na_cl_range'][1]:.2f} Å, largest distance {s['largest_distance_max']:.2f} Å"
        )

    by_arm: dict[str, list[dict]] = {}
    for run in results["runs"]:
        by_arm.setdefault(run["arm"], []).append(run)
    arms = [a for a in ARMS if a in by_arm]
    if not arms:
        return
    curves = {a: {k: mean_curve(by_arm[a], k) for k in ("forces_rmse", "energy_rmse")} for a in arms}
    seeds = sorted({run["seed"] for run in results["runs"]})
    print(f"\nTest errors on {results['test_set']} ({results['n_test']} frames), mean ± std over seeds {seeds}:\n")
    print_curves(curves, arms, arms, len(seeds), energy_digits=1)

    pairs = [(b, a) for b, a in (("scratch", "finetune"), ("scratch", "zero_shot"), ("finetune", "zero_shot"))]
    pairs = [(b, a) for b, a in pairs if b in curves and a in curves]
    for base, arm in pairs:
        print(
            f"\nLabels saved, {arm} vs {base} (force RMSE, mean curves): N_{arm} is the fewest labels at which "
            f"{arm} is at or below {base}'s error at N (interpolated; at its first point: at most that many):\n"
        )
        print(f"| N ({base}) | {base} F (eV/Å) | N_{arm} | ratio N / N_{arm} |")
        print("| --- | --- | --- | --- |")
        labels_b, mean_b = curves[base]["forces_rmse"][:2]
        labels_a, mean_a = curves[arm]["forces_rmse"][:2]
        for n, target in zip(labels_b, mean_b):
            n_a = labels_to_reach(labels_a, mean_a, target)
            if n_a is None:
                print(f"| {int(n)} | {target:.3f} | not reached | - |")
            else:
                first = " (first point)" if n_a == labels_a[0] else ""
                print(f"| {int(n)} | {target:.3f} | {n_a:.1f}{first} | {n / n_a:.2f}x |")

    print(
        "\nPer campaign: wall time, bootstrap training frames from foundation MD / from rattles, Na-Cl (Å) of them:\n"
    )
    print(
        "| arm | seed | wall (s) | stop | bootstrap MD / rattle | bootstrap Na-Cl (Å) | last labels | last F (eV/Å) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in sorted(results["runs"], key=lambda r: (ARMS.index(r["arm"]), r["seed"])):
        b = run["bootstrap"]
        distances = b["na_cl"]["md"] + b["na_cl"]["rattle"]
        span = f"{min(distances):.2f}-{max(distances):.2f}" if distances else "-"
        last = run["versions"][-1]
        print(
            f"| {run['arm']} | {run['seed']} | {run['wall_s']:.0f} | {run['stop_reason']} | "
            f"{b['from_md']} / {b['from_rattle']} | {span} | {last['labels']} | {last['forces_rmse']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--campaign", type=Path, default=ROOT / "examples/nacl-water.yaml")
    parser.add_argument("--test", type=Path, default=ROOT / "examples/data/nacl-water-md300K.extxyz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ionflow-zero-shot")
    parser.add_argument("--quick", action="store_true", help="Smoke run: tiny foundation and campaigns.")
    parser.add_argument("--report", action="store_true", help="Only re-print the tables from results.json.")
    args = parser.parse_args()
    out = args.out.resolve()
    results_path = out / "results.json"

    if not args.report:
        from ionflow.platform.structures import read_structures, with_reference_labels

        out.mkdir(parents=True, exist_ok=True)
        test_frames = [with_reference_labels(a) for a in read_structures(args.test)]
        base = yaml.safe_load(args.campaign.read_text())
        results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
        t0 = time.perf_counter()
        foundation, record = make_foundation(base, out, test_frames, args.quick)
        results.update(
            system=f"{base['name']} ({test_frames[0].get_chemical_formula()})",
            test_set=str(args.test.relative_to(ROOT) if args.test.resolve().is_relative_to(ROOT) else args.test),
            n_test=len(test_frames),
            changes=BENCHMARK_CHANGES,
            architecture=ARCH,
            md_steps=MD_STEPS,
            quick=args.quick,
            foundation=record,
        )
        results_path.write_text(json.dumps(results, indent=1))
        print(f"foundation ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        for seed in args.seeds:
            for arm in args.arms:
                path = campaign_file(base, arm, seed, out, foundation, args.quick)
                run = {
                    "arm": arm,
                    "seed": seed,
                    **run_campaign(path, test_frames),
                    "bootstrap": bootstrap_origins(path),
                }
                results["runs"] = [r for r in results["runs"] if (r["arm"], r["seed"]) != (arm, seed)] + [run]
                results_path.write_text(json.dumps(results, indent=1))
                last = run["versions"][-1]
                print(
                    f"== {arm} seed {seed}: {run['wall_s']:.0f} s, {last['labels']} labels, "
                    f"test F {last['forces_rmse']:.3f} eV/Å, E {1000 * last['energy_rmse']:.2f} meV/atom "
                    f"({run['stop_reason']}); bootstrap {run['bootstrap']['from_md']} MD / "
                    f"{run['bootstrap']['from_rattle']} rattle",
                    flush=True,
                )
    report(json.loads(results_path.read_text()))


if __name__ == "__main__":
    main()
