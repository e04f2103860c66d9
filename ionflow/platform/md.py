"""Exploration: Langevin MD walkers driven by the ensemble mean, stopped where it is unsure.

All walkers of an iteration move together: they are concatenated into one ASE
``Atoms`` integrated by ASE's ``Langevin`` (a per-atom thermostat, so walkers stay
independent), and a calculator splits that system back into one graph per walker
so the ensemble evaluates every walker in a single batched call per step.
A walker whose largest per-atom force spread passes ``stop_uncertainty``, or
whose atoms come unphysically close, is frozen (``FixAtoms``) and sampled no more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from ionflow.platform.model.ensemble import Ensemble
from ionflow.platform.model.graph import build_batch
from ionflow.platform.structures import REF_PREFIX

#: Closest contact (Å) below which a walker is stopped as unphysical.
MIN_CONTACT = 0.5


@dataclass
class WalkerResult:
    """One walker's run. ``frames`` are sampled snapshots; each carries in ``info``:
    ``md_step``, ``force_std_max`` (eV/Å), ``energy_std`` (eV), ``walker``."""

    walker: int
    start: Atoms
    last: Atoms
    n_steps_done: int
    stop_reason: str
    frames: list[Atoms] = field(default_factory=list)
    wall_time_s: float = 0.0


#: Verlet skin (Å): the walkers' neighbour list holds the pairs within r_max + skin and is rebuilt
#: only once an atom has moved skin/2 since; every step keeps the pairs within r_max of it, so the
#: model sees the graph a fresh neighbour list would give. 0 rebuilds it every step.
VERLET_SKIN = 0.5


class _WalkersCalculator(Calculator):
    """Ensemble mean over a concatenation of walkers, with per-walker spreads and closest contacts."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, ensemble: Ensemble, templates: Sequence[Atoms], skin: float = VERLET_SKIN) -> None:
        super().__init__()
        if skin < 0:
            raise ValueError(f"the Verlet skin must be >= 0 Å, got {skin}")
        self.ensemble = ensemble
        self.templates = list(templates)
        self.offsets = np.cumsum([0] + [len(t) for t in templates])
        self.skin = float(skin)
        self.rebuilds = 0
        self._graph: dict[str, torch.Tensor] | None = None  # pairs within r_max + skin at _built
        self._built: np.ndarray | None = None

    def split(self, positions: np.ndarray) -> list[Atoms]:
        frames = []
        for w, tmpl in enumerate(self.templates):
            frame = tmpl.copy()
            frame.positions = positions[self.offsets[w] : self.offsets[w + 1]]
            frames.append(frame)
        return frames

    def _batch(self, positions: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This step's graph and each pair's distance (Å) within r_max, taken from the list of pairs
        within r_max + skin, rebuilt when an atom has moved more than skin/2 since it was built."""
        moved = np.inf if self._built is None else float(np.sqrt(((positions - self._built) ** 2).sum(-1)).max())
        if moved > 0.5 * self.skin:
            self._graph = build_batch(
                self.split(positions),
                self.ensemble.z_table,
                self.ensemble.r_max + self.skin,
                dtype=self.ensemble.spec.dtype,
                device=self.ensemble.device,
            )
            self._built = positions.copy()
            self.rebuilds += 1
        graph = self._graph
        pos = torch.as_tensor(positions, dtype=graph["positions"].dtype, device=graph["positions"].device)
        i, j = graph["edge_index"]
        distance = torch.linalg.vector_norm(pos[j] - pos[i] + graph["shifts"], dim=-1)
        keep = distance < self.ensemble.r_max
        batch = dict(graph, positions=pos, edge_index=graph["edge_index"][:, keep])
        batch["shifts"], batch["unit_shifts"] = graph["shifts"][keep], graph["unit_shifts"][keep]
        return batch, distance[keep]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        batch, distance = self._batch(self.atoms.positions)
        pred = {k: v.cpu() for k, v in self.ensemble.predict(batch).items()}
        # each walker's closest contact (Å) among its pairs within r_max (> MIN_CONTACT: a closer pair
        # is always among them), an atom and its own images apart; inf where it has none
        i, j = batch["edge_index"]
        other = i != j
        contact = torch.full((len(self.templates),), torch.inf, dtype=distance.dtype, device=distance.device)
        contact = contact.scatter_reduce(0, batch["batch"][i[other]], distance[other], reduce="amin")
        self.results = {
            "energy": float(pred["energy"].sum()),
            "forces": pred["forces"].numpy().astype(float),
            "walker_energy_std": pred["energy_std"].numpy().astype(float),  # [walkers] eV
            "force_std": pred["force_std"].numpy().astype(float),  # [n_atoms] eV/Å
            "closest_contact": contact.cpu().numpy().astype(float),  # [walkers] Å, inf beyond r_max
        }


def run_walkers(
    ensemble: Ensemble,
    starts: Sequence[Atoms],
    steps: int,
    timestep_fs: float,
    temperature_K: float | Sequence[float],
    friction_per_fs: float,
    sample_every: int,
    stop_uncertainty: float,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    skin: float = VERLET_SKIN,
) -> list[WalkerResult]:
    """Run one Langevin walker from each of ``starts`` for up to ``steps`` steps, at
    ``temperature_K`` (K; one for all, or one per walker); ``skin`` (Å): see :data:`VERLET_SKIN`."""
    t0 = time.perf_counter()
    templates = [s.copy() for s in starts]
    for t in templates:
        t.calc = None
        t.set_constraint()
        # A start's reference labels belong to its geometry, not to the frames the walker visits.
        for store in (t.info, t.arrays):
            for key in [k for k in store if k.startswith(REF_PREFIX)]:
                del store[key]
    system = templates[0].copy()
    for t in templates[1:]:
        system += t
    calc = _WalkersCalculator(ensemble, templates, skin)
    system.calc = calc
    rng = np.random.default_rng(seed)
    per_walker = np.broadcast_to(np.asarray(temperature_K, dtype=float), (len(templates),))
    uniform = bool(np.all(per_walker == per_walker[0]))
    if uniform:
        MaxwellBoltzmannDistribution(system, temperature_K=float(per_walker[0]), rng=rng)
    else:
        momenta = []
        for w, t in enumerate(templates):
            part = t.copy()
            MaxwellBoltzmannDistribution(part, temperature_K=float(per_walker[w]), rng=rng)
            momenta.append(part.get_momenta())
        system.set_momenta(np.concatenate(momenta))
    dyn = Langevin(
        system,
        timestep=timestep_fs * units.fs,
        temperature_K=float(per_walker[0]),
        friction=friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )
    if not uniform:
        # ASE's Langevin thermostat acts per atom (its noise scales with kT/m): one kT per atom
        sizes = [len(t) for t in templates]
        dyn.temp = units.kB * np.repeat(per_walker, sizes)[:, None]
        dyn.updatevars()

    n = len(templates)
    active = np.ones(n, dtype=bool)
    steps_done = np.zeros(n, dtype=int)
    reasons = ["completed"] * n
    frames: list[list[Atoms]] = [[] for _ in range(n)]
    last = [t.copy() for t in templates]

    def snapshot(w: int, step: int, frame: Atoms, fstd: np.ndarray, estd: float) -> None:
        frame.info.update(md_step=step, walker=w, force_std_max=float(fstd.max()), energy_std=float(estd))
        frames[w].append(frame)

    for step in range(1, steps + 1):
        dyn.run(1)
        res = calc.results
        split = calc.split(system.positions)
        newly_stopped = []
        for w in np.flatnonzero(active):
            lo, hi = calc.offsets[w], calc.offsets[w + 1]
            fstd = res["force_std"][lo:hi]
            steps_done[w] = step
            contact = res["closest_contact"][w]
            if contact < MIN_CONTACT:
                reasons[w] = f"unphysical: atoms {contact:.2f} Å apart at step {step}"
            elif fstd.max() > stop_uncertainty:
                reasons[w] = f"force spread {fstd.max():.2f} eV/Å > {stop_uncertainty} at step {step}"
                snapshot(w, step, split[w], fstd, res["walker_energy_std"][w])
            else:
                last[w] = split[w]
                if step % sample_every == 0:
                    snapshot(w, step, split[w].copy(), fstd, res["walker_energy_std"][w])
                continue
            newly_stopped.append(w)
        if newly_stopped:
            active[newly_stopped] = False
            frozen = np.concatenate([np.arange(calc.offsets[w], calc.offsets[w + 1]) for w in np.flatnonzero(~active)])
            momenta = system.get_momenta()
            momenta[frozen] = 0.0
            system.set_momenta(momenta)
            system.set_constraint(FixAtoms(indices=frozen))
        if progress:
            progress(step, steps)
        if not active.any():
            break

    wall = time.perf_counter() - t0
    return [
        WalkerResult(
            walker=w,
            start=starts[w],
            last=last[w],
            n_steps_done=int(steps_done[w]),
            stop_reason=reasons[w],
            frames=frames[w],
            wall_time_s=wall / n,
        )
        for w in range(n)
    ]
