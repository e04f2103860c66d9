"""One member of an ensemble (or a shallow ensemble's backbone with its K heads): MACE backbone
+ charges + Coulomb, energy-conserving.

    E = E_local(MACE features, Q, M) + E_coulomb(q, r) − μ·𝓔 (finite systems in a field)

Design points (``ModelSettings.electrostatics``):
  none          E_local only (the local energy still sees Q and M);
  latent        charges from features, shifted uniformly to sum to Q;
  equilibrated  Fukui-weighted equilibration per spin channel (exact Q and M);
  polarisable   ``polarisation_steps`` fixed updates: each atom's electrostatic
                potential V_i = ∂E_coulomb/∂q_i enters a small network that updates the
                raw charges and Fukui weights, then re-equilibrate;
  qeq           charge equilibration (:mod:`~ionflow.platform.model.qeq`) around the
                equilibrated head's charges q⁰: electronegativity χ and hardness J from the
                features, charges minimising Σ χ_i q_i + ½ J_i (q_i − q⁰_i)² + E_coulomb(q) under
                Σq = Q by one linear solve over the whole structure, so they respond to atoms
                beyond the cutoff; as in 4G-HDNNP the energy adds E_coulomb of those charges
                (χ and J only shape them); spin populations as in equilibrated.
Charges are Gaussian clouds of width ``charge_width`` (Å). Forces and stress are
autograd derivatives of the total energy (MACE's ``get_outputs``), through the charge
prediction, the equilibration and every polarisation step.
"""

from __future__ import annotations

import torch
from ase.data import atomic_masses
from mace.modules.utils import get_outputs  # noqa: E402, I001

from ionflow.platform.model.charges import dipole, equilibrate_spin
from ionflow.platform.model.electrostatics import coulomb_energy, direct_energies
from ionflow.platform.model.mace_blocks import ScaleShiftMACE
from ionflow.platform.model.qeq import MIN_START_HARDNESS, equilibrate_charges, starting_parameters
from ionflow.platform.settings import ModelSettings

ELECTROSTATICS = ("none", "latent", "equilibrated", "polarisable", "qeq")

#: Hidden width of the small MLP heads (state energy, charges, polarisation updates): they read a
#: few dozen invariant features, and a few times that is enough; wider only costs time.
HEAD_HIDDEN = 16

#: Scale of a shallow ensemble's initial head weights, in units of 1/sqrt(hidden): small, so the
#: heads start near one another, but random, so that they start apart.
HEAD_INIT_SCALE = 0.1


def _mlp(n_in: int, hidden: int, n_out: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, n_out))


def scalar_feature_index(backbone: ScaleShiftMACE) -> torch.Tensor:
    """Columns of MACE's concatenated node features that are invariant scalars (0e)."""
    index, offset = [], 0
    for product in backbone.products:
        for mul, ir in product.linear.irreps_out:
            width = mul * ir.dim
            if ir.l == 0 and ir.p == 1:
                index.extend(range(offset, offset + width))
            offset += width
    return torch.tensor(index, dtype=torch.long)


class Heads(torch.nn.Module):
    """K independent two-layer readouts of one input, evaluated together: (n, n_in) -> (n, K)."""

    def __init__(self, n_in: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.first = torch.nn.Linear(n_in, hidden * heads)
        self.weight = torch.nn.Parameter(torch.randn(heads, hidden) * HEAD_INIT_SCALE / hidden**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(heads))
        self.heads, self.hidden = heads, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.first(x)).view(-1, self.heads, self.hidden)
        return torch.einsum("nkh,kh->nk", h, self.weight) + self.bias


# On a GPU, up to this many edges the heads' contrast gradients go through one vmapped backward
# pass; beyond it, and always on a CPU, one pass per row. On a CPU (torch 2.13, 1-2 threads, 3 heads,
# 24-573 atoms) the vmapped pass is the slower: 1.6-1.9x the loop's time for predictions, 1.2-1.3x
# for a training step.
_BATCHED_EDGES = 4000


def _gradients(outputs: torch.Tensor, positions: torch.Tensor, training: bool, batched: bool) -> torch.Tensor:
    """Gradients (m, n, 3) of each of the m scalars in ``outputs`` with respect to ``positions``."""
    m = outputs.shape[0]
    grads = None
    if batched and m > 1:
        eye = torch.eye(m, dtype=outputs.dtype, device=outputs.device)
        try:
            grads = torch.autograd.grad(
                outputs,
                positions,
                grad_outputs=eye,
                is_grads_batched=True,
                retain_graph=True,
                create_graph=training,
                allow_unused=True,
            )[0]
        except RuntimeError:
            # some of MACE's TorchScript kernels lack vmap rules on some graphs ("Batching rule not
            # implemented for aten::detach"): the graph is retained, so one pass per output still works
            batched = False
    if not batched or m == 1:
        rows = [
            torch.autograd.grad(outputs[j], positions, retain_graph=True, create_graph=training, allow_unused=True)[0]
            for j in range(m)
        ]
        grads = None if any(r is None for r in rows) else torch.stack(rows)
    if grads is None:  # no edges: positions do not enter the local energy
        return torch.zeros(m, *positions.shape, dtype=positions.dtype, device=positions.device)
    return grads


class _HeadForces(torch.autograd.Function):
    """Every head's forces F_k = F̄ − Σ_j C_jk G_j [K, n, 3] from the mean forces F̄ [n, 3] and the
    contrasts' gradients G [K−1, n, 3] (C: the contrasts, whose rows sum to zero).

    Its backward skips G when the incoming gradient is the same for every head, as it is for a loss
    of the heads' mean forces only (the squared error): G's gradient is then exactly zero, and
    without this autograd would carry zeros back through the K−1 contrasts' double-backward graphs
    (a training step 10 % faster). Autograd still visits those graphs, and MACE's TorchScript
    nodes there compute with zeros: a loss that needs only the mean forces should ask for them
    alone (``Member.forward(head_forces=False)``), which costs no contrast passes at all.
    """

    @staticmethod
    def forward(mean: torch.Tensor, grads: torch.Tensor, contrasts: torch.Tensor) -> torch.Tensor:
        return mean[None] - torch.einsum("jk,jna->kna", contrasts, grads)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (contrasts,) = ctx.saved_tensors
        grad_mean = grad.sum(0) if ctx.needs_input_grad[0] else None
        grad_grads = None
        if ctx.needs_input_grad[1] and not torch.equal(grad, grad[:1].expand_as(grad)):
            grad_grads = -torch.einsum("jk,kna->jna", contrasts, grad)
        return grad_mean, grad_grads, None


def _helmert(k: int) -> torch.Tensor:
    """(k−1, k) orthonormal rows, each summing to zero: a basis of deviations from the mean."""
    rows = torch.zeros(k - 1, k, dtype=torch.float64)
    for j in range(1, k):
        rows[j - 1, :j] = 1.0
        rows[j - 1, j] = -float(j)
        rows[j - 1] /= (j * (j + 1)) ** 0.5
    return rows


class Member(torch.nn.Module):
    """MACE backbone with an electrostatic head (see the module docstring)."""

    def __init__(self, backbone: ScaleShiftMACE, settings: ModelSettings, z_table: list[int], heads: int = 1) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"a member needs at least one readout head, got {heads}")
        self.heads = int(heads)
        self.backbone = backbone
        self.mode = str(settings.electrostatics)
        if self.mode not in ELECTROSTATICS:
            raise ValueError(f"electrostatics must be one of {ELECTROSTATICS}, got {self.mode!r}")
        self.charge_width = float(settings.charge_width)
        self.steps = int(settings.polarisation_steps) if self.mode == "polarisable" else 0
        dtype = next(backbone.parameters()).dtype
        self.register_buffer("scalars", scalar_feature_index(backbone), persistent=False)
        self.register_buffer("masses", torch.tensor([atomic_masses[z] for z in z_table], dtype=dtype), persistent=False)
        # heads read the invariant features and the element: an atom with no neighbours has
        # zero MACE features whatever its element, yet Na and Cl must not get the same charge
        n_s = int(self.scalars.numel()) + len(z_table)
        hidden = HEAD_HIDDEN
        # node energy from the features and the structure's charge state: E depends on Q and M.
        # A shallow ensemble has K such readouts (:class:`Heads`) on the shared backbone.
        if self.heads == 1:
            self.state = _mlp(n_s + 2, hidden, 1).to(dtype)
            torch.nn.init.zeros_(self.state[-1].weight)
            torch.nn.init.zeros_(self.state[-1].bias)
        else:
            self.state = Heads(n_s + 2, hidden, self.heads).to(dtype)
            # orthonormal contrasts: their rows span the heads' deviations from the mean
            self.register_buffer("contrasts", _helmert(self.heads).to(dtype), persistent=False)
        if self.mode != "none":
            # q⁰_α, q⁰_β, f_α, f_β; qeq puts χ (eV/e) and its raw hardness in front of them
            self.charge_head = _mlp(n_s, hidden, 6 if self.mode == "qeq" else 4).to(dtype)
        if self.mode == "qeq":
            # per-element starting χ and J (J holds the charges to their local reference: starting at IE − EA,
            # the charges begin close to the equilibrated head's); persistent, so a model file keeps them
            chi0, hardness0 = starting_parameters(z_table)
            start = torch.clamp(hardness0, min=MIN_START_HARDNESS)
            self.register_buffer("qeq_chi0", chi0.to(dtype))  # [elements] eV/e
            self.register_buffer("qeq_hardness0", (start + torch.log(-torch.expm1(-start))).to(dtype))  # softplus⁻¹
        if self.steps:
            self.update_head = _mlp(n_s + 1, hidden, 4).to(dtype)  # ... and the potential V_i

    def _coulomb(
        self, positions: torch.Tensor, q: torch.Tensor, cells: torch.Tensor, periodic: list[bool], ptr: torch.Tensor
    ) -> torch.Tensor:
        bounds = ptr.tolist()
        energies = torch.zeros(len(periodic), dtype=positions.dtype, device=positions.device)
        finite = [g for g, is_periodic in enumerate(periodic) if not is_periodic]
        if finite:  # all finite structures in one vectorised pair sum
            ranges = [(bounds[g], bounds[g + 1]) for g in finite]
            index = torch.tensor(finite, device=positions.device)
            energies = energies.index_add(0, index, direct_energies(positions, q, ranges, self.charge_width))
        for g, is_periodic in enumerate(periodic):
            if is_periodic:
                lo, hi = bounds[g], bounds[g + 1]
                e_g = coulomb_energy(positions[lo:hi], q[lo:hi], cells[g], pbc=True, sigma=self.charge_width)
                energies = energies.index_add(0, torch.tensor([g], device=positions.device), e_g[None])
        return energies  # [g] eV

    def environments(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The invariant scalar (0e) channels of the backbone's node features, every layer: [n, d].

        What the heads read, less the element one-hot: an atom's environment in the model's own
        feature space, for comparing environments of one element (selection)."""
        out = self.backbone(dict(batch), training=False, compute_force=False)
        return out["node_feats"][:, self.scalars]

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        training: bool = False,
        compute_stress: bool = False,
        head_forces: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Energy, forces, charges, spins, dipole and Coulomb energy of a batch (see ``result`` below).

        With K > 1 heads also ``energy_heads`` [K, g] and ``forces_heads``: every head's forces
        [K, n, 3], or with ``head_forces=False`` only their mean [1, n, 3] — the forces of the
        mean energy, one backward pass instead of K (what a loss that needs no per-head forces
        asks for: the squared error of the mean, without the NLL)."""
        data = dict(batch)
        out = self.backbone(data, training=training, compute_force=False, compute_displacement=compute_stress)
        n_graphs = int(batch["ptr"].numel() - 1)
        index = batch["batch"]
        features = torch.cat([out["node_feats"][:, self.scalars], batch["node_attrs"]], dim=-1)  # [n, n_s] invariant
        charge = batch["total_charge"].to(features.dtype)  # [g] e
        multiplicity = batch["multiplicity"].to(features.dtype)  # [g]
        state = torch.cat([features, charge[index, None], (multiplicity - 1)[index, None]], dim=-1)
        node_heads = self.state(state)  # [n, H] eV
        local_heads = out["energy"][None] + torch.zeros(
            self.heads, n_graphs, dtype=node_heads.dtype, device=node_heads.device
        ).index_add_(1, index, node_heads.T)  # [H, g] eV
        energy = local_heads.mean(0)  # [g] eV; with one head, that head

        positions = data["positions"]  # displaced by the strain when stress is asked for
        cells = batch["cell"].view(-1, 3, 3)
        if compute_stress:
            strain = 0.5 * (out["displacement"] + out["displacement"].transpose(-1, -2))
            cells = cells + cells @ strain
        periodic = [bool(torch.any(c != 0)) for c in batch["cell"].view(-1, 3, 3)]
        n_atoms = positions.shape[0]
        charges = torch.zeros(n_atoms, dtype=energy.dtype, device=energy.device)
        spins = torch.zeros_like(charges)
        e_coulomb = torch.zeros_like(energy)
        if self.mode == "qeq":
            head = self.charge_head(features)  # [n, 6]
            elements = batch["node_attrs"].to(head.dtype)  # [n, elements] one-hot
            chi = elements @ self.qeq_chi0 + head[:, 0]  # [n] eV/e
            # [n] eV/e², ≥ 0 keeps the solve's minimum unique
            hardness = torch.nn.functional.softplus(elements @ self.qeq_hardness0 + head[:, 1])
            # local reference charges q⁰ and the spin populations: the equilibrated head's
            reference, spins = equilibrate_spin(head[:, 2:4], head[:, 4:6], index, charge, multiplicity)
            charges, _, _, e_coulomb = equilibrate_charges(
                chi,
                hardness,
                positions,
                index,
                batch["ptr"],
                charge,
                self.charge_width,
                cells,
                periodic,
                reference_charges=reference,
            )
            energy = energy + e_coulomb
        elif self.mode != "none":
            head = self.charge_head(features)  # [n, 4]
            raw, weights = head[:, :2], head[:, 2:]
            fukui = None if self.mode == "latent" else weights
            charges, spins = equilibrate_spin(raw, fukui, index, charge, multiplicity)
            for _ in range(self.steps):
                e_c = self._coulomb(positions, charges, cells, periodic, batch["ptr"])
                # V_i = ∂E/∂q_i (eV/e): kept in the graph so forces stay exact derivatives
                potential = torch.autograd.grad(e_c.sum(), charges, create_graph=True)[0]
                update = self.update_head(torch.cat([features, potential[:, None]], dim=-1))
                raw, weights = raw + update[:, :2], weights + update[:, 2:]
                charges, spins = equilibrate_spin(raw, weights, index, charge, multiplicity)
            e_coulomb = self._coulomb(positions, charges, cells, periodic, batch["ptr"])
            energy = energy + e_coulomb
        masses = batch["node_attrs"].to(self.masses.dtype) @ self.masses  # [n] amu
        mu = dipole(charges, positions, masses, index, n_graphs)  # [g, 3] e·Å
        mu = mu * torch.tensor([0.0 if p else 1.0 for p in periodic], dtype=mu.dtype, device=mu.device)[:, None]
        if "field" in batch:  # uniform field (V/Å), finite systems only
            energy = energy - (mu * batch["field"].to(mu.dtype)).sum(-1)

        stress, forces = None, None
        per_head = self.heads > 1 and head_forces
        if per_head:
            # the heads differ only in their local energy: their force deviations from the mean are
            # the gradients of H−1 orthonormal contrasts. In one batched pass (see _BATCHED_EDGES) the
            # mean energy's gradient joins them unless stress is asked for; else it is a pass of its
            # own (after theirs: in evaluation it frees the graph), kept apart from theirs so that
            # a loss of the mean forces needs no gradient through them (see _HeadForces)
            contrast = (self.contrasts @ local_heads).sum(-1)  # [H−1]
            batched = batch["positions"].is_cuda and batch["edge_index"].shape[1] <= _BATCHED_EDGES
            joint = batched and not compute_stress
            rows = torch.cat([energy.sum()[None], contrast]) if joint else contrast
            grads = _gradients(rows, batch["positions"], training, batched=batched)
            if joint:
                forces, grads = -grads[0], grads[1:]
        if forces is None:
            forces, _, stress, _, _ = get_outputs(
                energy=energy,
                positions=batch["positions"],
                cell=batch["cell"],
                displacement=out["displacement"] if compute_stress else None,
                training=training,
                compute_force=True,
                compute_virials=False,
                compute_stress=compute_stress,
            )
        result = {
            "energy": energy,  # [g] eV, the heads' mean
            "forces": forces,  # [n, 3] eV/Å, −∂energy/∂r
            "charges": charges,  # [n] e
            "spins": spins,  # [n] α − β populations
            "dipole": mu,  # [g, 3] e·Å about the centre of mass (0 for periodic structures)
            "energy_coulomb": e_coulomb,  # [g] eV
        }
        if compute_stress:
            result["stress"] = stress  # [g, 3, 3] eV/Å^3
        if self.heads > 1:
            shared = energy - local_heads.mean(0)  # [g] Coulomb and field terms, the same for every head
            result["energy_heads"] = local_heads + shared[None]  # [H, g] eV
        if per_head:
            # −∂E_k/∂r = F_mean − Σ_j C_jk ∂(C E)_j/∂r, since E_k − Ē = Σ_j C_jk (C E)_j
            result["forces_heads"] = _HeadForces.apply(forces, grads, self.contrasts)  # [H, n, 3]
            # F_k − F̄ alone [H, n, 3]: what the heads' force variance needs, with no path back through
            # the mean force's double-backward graph (whose gradient under a variance is zero anyway)
            result["forces_deviation_heads"] = -torch.einsum("jk,jna->kna", self.contrasts, grads)
        elif self.heads > 1:
            result["forces_heads"] = forces[None]  # [1, n, 3] eV/Å, the heads' mean: Σ_k F_k / K = −∂Ē/∂r
        return result
