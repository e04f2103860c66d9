"""Charge equilibration (QEq): charges that depend on the whole structure, by one linear solve.

Rappé & Goddard's QEq, with learned, environment-dependent parameters as in the fourth-generation
neural network potentials (Ko et al. 2021). Each atom has an electronegativity χ_i (eV/e), a
hardness J_i ≥ 0 (eV/e²) and optionally a reference charge q⁰_i (e), all computed from its local
features. The charges q (e) minimise

    E_qeq(q) = Σ_i (χ_i q_i + ½ J_i (q_i − q⁰_i)² + ½ J_σ q_i²) + E_coulomb(q),    J_σ = k_e / (√π σ)

under Σ_i q_i = Q exactly. E_coulomb is the Gaussian-cloud energy of
:mod:`~ionflow.platform.model.electrostatics` (one width σ for every atom) and ½ J_σ q_i² the
self-energy of cloud i. Writing E_coulomb = ½ qᵀ A q, the minimum solves, per structure,

    [ H   1 ] [ q ]   [ J q⁰ − χ ]
    [ 1ᵀ  0 ] [ λ ] = [     Q    ],      H = A + diag(J + J_σ)   (λ: the chemical potential, eV/e)

H is positive definite (the Coulomb energy of Gaussian clouds is, and J ≥ 0), so the solution
is unique and is the minimum. The solve (``torch.linalg.solve``) is differentiable: forces and
stress are autograd derivatives of the energy through the charges. Since A couples every pair,
the charges respond to atoms far beyond the cutoff: charge flows between separated fragments
and changes with their distance (two ions: q = Δ/(S − 2k_e/r)), and within a molecule in the
potential of a distant ion. Large J holds the charges at q⁰ (the equilibrated head's limit).

Optionally each atom also carries an induced Gaussian dipole μ_i (width σ) with energy
½ (1/α_i + D_σ)|μ_i|², solved together with the charges (finite structures only).

Finite structures of a batch are solved together, each padded to the largest (time O(g m³),
memory O(g m²), m the most atoms in one structure). Periodic structures are solved one at a
time with A from torch-pme (:func:`~ionflow.platform.model.electrostatics.periodic_coulomb_matrix`,
neutralising background included): a dense n × n matrix, so at most
:data:`MAX_PERIODIC_ATOMS` atoms per cell; larger cells raise ``ValueError``.
Units: Å, e, eV.
"""

from __future__ import annotations

import math
import warnings

import torch

from ionflow.platform.model.charges import equilibrate
from ionflow.platform.model.electrostatics import COULOMB_CONSTANT, periodic_coulomb_matrix

#: Most atoms of a periodic cell whose charges are equilibrated by a dense solve: the n × n Ewald
#: matrix takes n torch-pme channels and the solve O(n³); larger cells need an iterative solver.
MAX_PERIODIC_ATOMS = 1000

#: Least starting hardness J (eV/e²): where an element's IE − EA is lower or unknown (softplus, which
#: the model puts on J, cannot reach 0).
MIN_START_HARDNESS = 0.5

#: eV/e per unit of Pauling electronegativity: maps Na and Cl (0.93, 3.16) onto the difference of
#: their Mulliken electronegativities (IE + EA)/2 (2.84, 8.29 eV). Only differences of χ matter.
PAULING_SCALE = 2.44


def starting_parameters(z_table: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting electronegativity χ⁰ (eV/e) and total hardness J⁰ (eV/e²) of each element of ``z_table``
    (pymatgen's element data), which the model's features then correct:

    χ⁰ = PAULING_SCALE · (Pauling electronegativity). Mulliken's (IE + EA)/2 puts H (7.2 eV) almost
    level with O (7.5 eV), so water would start with nearly no charges; Pauling's scale orders the
    bond polarities of molecules (O−0.44/H+0.22 in water at the start vs xTB's −0.57/+0.28).
    J⁰ = IE − EA (Parr and Pearson's chemical hardness, twice the usual η): the curvature of an
    isolated atom's energy in its charge. Elements without the data start at χ⁰ = 0 and J⁰ = 0
    (the model raises J⁰ to :data:`MIN_START_HARDNESS`)."""
    from pymatgen.core import Element

    chi, hardness = [], []
    for z in z_table:
        element = Element.from_Z(int(z))
        with warnings.catch_warnings():  # pymatgen warns where it has no value (noble gases), and we know
            warnings.simplefilter("ignore", UserWarning)
            pauling = element.X  # NaN where undefined
            ionisation = element.ionization_energies[0] if element.ionization_energies else None
            affinity = element.electron_affinity
        chi.append(PAULING_SCALE * pauling if math.isfinite(pauling) else 0.0)
        known = ionisation is not None and affinity is not None
        hardness.append(ionisation - affinity if known else 0.0)
    return torch.tensor(chi, dtype=torch.float64), torch.tensor(hardness, dtype=torch.float64)


def self_hardness(width: float) -> float:
    """J_σ = k_e/(√π σ) (eV/e²): ½ J_σ q² is the self-energy of a Gaussian charge q of width σ (Å)."""
    return COULOMB_CONSTANT / (math.sqrt(math.pi) * width)


def self_stiffness(width: float) -> float:
    """D_σ = k_e/(6√π σ³) (eV/(e·Å)²): ½ D_σ |μ|² is the self-energy of a Gaussian dipole μ of width σ (Å)."""
    return COULOMB_CONSTANT / (6.0 * math.sqrt(math.pi) * width**3)


def _pair_kernels(r: torch.Tensor, width: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f = erf(r/a)/r (a = √2·σ_ij = 2σ), g1 = f'/r and g2 = (f'' − f'/r)/r², so that ∇∇f = g1·I + g2·d dᵀ."""
    a = 2.0 * width
    e = torch.erf(r / a)
    de = 2.0 / (a * math.sqrt(math.pi)) * torch.exp(-((r / a) ** 2))  # d erf(r/a) / dr
    f = e / r
    f1 = de / r - e / r**2
    f2 = -2.0 * de / a**2 - 2.0 * de / r**2 + 2.0 * e / r**3
    return f, f1 / r, (f2 - f1 / r) / r**2


def _finite_matrices(padded: torch.Tensor, mask: torch.Tensor, width: float, dipoles: bool) -> torch.Tensor:
    """Interaction matrices T (g, m·c, m·c) of padded finite structures, c = 1 (charges) or 4 (charge and
    dipole of each atom, in that order), with E_coulomb = ½ xᵀ T x. For a pair, d = r_i − r_j:
    charge-charge k_e f, charge_i-dipole_j −k_e g1 d, dipole-dipole −k_e (g1 I + g2 d dᵀ); zero on the
    diagonal and for pads."""
    g, m, _ = padded.shape
    eye = torch.eye(m, dtype=torch.bool, device=padded.device)
    valid = mask[:, :, None] & mask[:, None, :] & ~eye  # [g, m, m] real pairs
    d = padded[:, :, None, :] - padded[:, None, :, :]  # [g, m, m, 3] Å
    r2 = (d**2).sum(-1)  # [g, m, m] Å²
    # a placeholder 1 Å² where there is no pair keeps sqrt's gradient finite (r = 0 on the diagonal)
    r = torch.sqrt(torch.where(valid, r2, torch.ones_like(r2)))
    f, g1, g2 = _pair_kernels(r, width)
    if not dipoles:
        return torch.where(valid, COULOMB_CONSTANT * f, torch.zeros_like(f))
    charge_dipole = -g1[..., None] * d  # [g, m, m, 3]: q_i with μ_j
    dipole_dipole = -(
        g1[..., None, None] * torch.eye(3, dtype=d.dtype, device=d.device)
        + g2[..., None, None] * d[..., :, None] * d[..., None, :]
    )  # [g, m, m, 3, 3]
    block = torch.cat(
        [
            torch.cat([f[..., None, None], charge_dipole[..., None, :]], dim=-1),
            torch.cat([-charge_dipole[..., :, None], dipole_dipole], dim=-1),
        ],
        dim=-2,
    )  # [g, m, m, 4, 4]
    block = torch.where(valid[..., None, None], COULOMB_CONSTANT * block, torch.zeros_like(block))
    return block.permute(0, 1, 3, 2, 4).reshape(g, 4 * m, 4 * m)


def equilibrate_charges(
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    positions: torch.Tensor,
    batch: torch.Tensor,
    ptr: torch.Tensor,
    total_charge: torch.Tensor,
    width: float,
    cells: torch.Tensor,
    periodic: list[bool],
    inverse_polarisability: torch.Tensor | None = None,
    reference_charges: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """QEq charges of every structure of a batch, and their energies.

    electronegativity χ (n,) eV/e; hardness J (n,) eV/e², ≥ 0; positions (n, 3) Å; batch (n,) and
    ptr (g + 1,) as in the graph; total_charge Q (g,) e; width σ (Å) of every Gaussian charge;
    cells (g, 3, 3) Å, used where ``periodic[g]``. ``reference_charges`` q⁰ (n,) e: where J pulls
    each charge (default 0: plain QEq). ``inverse_polarisability`` 1/α (n,) eV/(e·Å)², ≥ 0:
    each atom also carries an induced Gaussian dipole μ_i (width σ), solved with the charges, with
    energy ½ (1/α_i + D_σ) |μ_i|² (D_σ: :func:`self_stiffness`); finite structures only.
    Returns charges q (n,) e summing to Q, induced dipoles μ (n, 3) e·Å (zero without α), E_qeq (g,)
    eV (the minimised energy above, Coulomb included) and its Coulomb part E_coulomb (g,) eV (pairs
    and images, no self-energy).
    """
    n, g = positions.shape[0], len(periodic)
    dipoles = inverse_polarisability is not None
    if dipoles and any(periodic):
        raise ValueError("qeq's induced dipoles are for finite structures only; periodic cells need charges only")
    c = 4 if dipoles else 1  # unknowns per atom
    sizes = ptr[1:] - ptr[:-1]
    m = int(sizes.max())
    local = torch.arange(n, device=positions.device) - ptr[batch]  # [n] index within its structure
    mask = torch.arange(m, device=positions.device)[None, :] < sizes[:, None]  # [g, m]
    dtype = positions.dtype

    padded = positions.new_zeros(g, m, 3).index_put((batch, local), positions)  # [g, m, 3] Å
    coulomb = _finite_matrices(padded, mask, width, dipoles)  # [g, m c, m c] eV/e²
    if any(periodic):
        bounds = ptr.tolist()
        blocks = []
        for k, is_periodic in enumerate(periodic):
            if not is_periodic:
                blocks.append(coulomb[k])
                continue
            lo, hi = bounds[k], bounds[k + 1]
            if hi - lo > MAX_PERIODIC_ATOMS:
                raise ValueError(
                    f"electrostatics 'qeq' solves a periodic cell densely, up to {MAX_PERIODIC_ATOMS} atoms; "
                    f"this one has {hi - lo}: use 'equilibrated' for larger cells"
                )
            a = periodic_coulomb_matrix(positions[lo:hi], cells[k], width)
            blocks.append(torch.nn.functional.pad(a, (0, m - (hi - lo), 0, m - (hi - lo))))
        coulomb = torch.stack(blocks)

    # per-atom self terms, [g, m, c]: J + J_σ for the charge, 1/α + D_σ for each dipole component; pads 1
    site = (hardness + self_hardness(width))[:, None]  # [n, 1]
    if dipoles:
        site = torch.cat([site, (inverse_polarisability + self_stiffness(width))[:, None].expand(n, 3)], dim=-1)
    diagonal = positions.new_ones(g, m, c).index_put((batch, local), site).view(g, m * c)
    reference = torch.zeros_like(electronegativity) if reference_charges is None else reference_charges  # q⁰ [n] e
    linear = electronegativity - hardness * reference  # [n] eV/e: ∂/∂q_i of χ_i q_i + ½ J_i (q_i − q⁰_i)² at 0
    chi = positions.new_zeros(g, m, c).index_put((batch, local, torch.zeros_like(local)), linear)
    is_charge = torch.zeros(g, m, c, dtype=dtype, device=positions.device)
    is_charge[:, :, 0] = mask.to(dtype)  # the constraint Σq = Q: zero on dipoles and pads (their q is 0)
    ones = is_charge.view(g, m * c)
    top = torch.cat([coulomb + torch.diag_embed(diagonal), ones[:, :, None]], dim=-1)  # [g, mc, mc+1]
    bottom = torch.cat([ones, torch.zeros(g, 1, dtype=dtype, device=positions.device)], dim=-1)  # [g, mc+1]
    system = torch.cat([top, bottom[:, None, :]], dim=1)  # [g, mc+1, mc+1]
    rhs = torch.cat([-chi.view(g, m * c), total_charge.to(dtype)[:, None]], dim=-1)  # [g, mc+1]
    solution = torch.linalg.solve(system, rhs)[:, : m * c].view(g, m, c)  # drop λ
    charges = solution[:, :, 0][batch, local]  # [n] e
    # the solve meets Σq = Q to rounding; a uniform shift of that residual makes it exact
    charges = equilibrate(charges, None, batch, total_charge.to(dtype))
    induced = solution[:, :, 1:][batch, local] if dipoles else torch.zeros_like(positions)  # [n, 3] e·Å

    unknowns = torch.cat([charges[:, None], induced], dim=-1)[:, :c]  # [n, c]
    x = positions.new_zeros(g, m, c).index_put((batch, local), unknowns).view(g, m * c)
    e_coulomb = 0.5 * torch.einsum("gi,gij,gj->g", x, coulomb, x)  # [g] eV
    e_site = (
        electronegativity * charges
        + 0.5 * hardness * (charges - reference) ** 2
        + 0.5 * self_hardness(width) * charges**2
    )  # [n] eV
    if dipoles:
        e_site = e_site + 0.5 * (site[:, 1:] * induced**2).sum(-1)
    e_qeq = e_coulomb + torch.zeros(g, dtype=dtype, device=positions.device).index_add(0, batch, e_site)
    return charges, induced, e_qeq, e_coulomb
