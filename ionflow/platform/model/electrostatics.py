"""Coulomb energy of point or Gaussian charges, finite or periodic, differentiable.

Units: positions and cell in Å, charges in e, widths σ in Å, energy in eV
(k_e = 14.399645 eV·Å/e², ``torchpme.prefactors.eV_A``).

Gaussian charges of widths σ_i interact as

    E = k_e/2 · Σ_{i≠j} q_i q_j · erf(r_ij / (√2 σ_ij)) / r_ij ,   σ_ij = √(σ_i² + σ_j²)

(the sum runs over periodic images in a periodic cell). Point charges are σ → 0
(erf → 1). The self-energy of each cloud, k_e q_i² / (2√π σ_i), is a per-atom term
and is NOT included: add it where a model wants it.

Finite systems are summed directly over pairs (O(n²) memory and time). Periodic
systems use erf(x)/r = 1/r − erfc(x)/r: the point-charge energy comes from
torch-pme (Ewald for small cells, PME for large ones, with torch-pme's own
numerical ``smearing``, unrelated to σ, chosen from ``accuracy`` and ``cutoff``),
and the short-ranged erfc part is summed over a neighbour list. torch-pme adds the
neutralising background of a charged cell.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from matscipy.neighbours import neighbour_list
from torchpme import CoulombPotential, EwaldCalculator, PMECalculator
from torchpme.prefactors import eV_A

COULOMB_CONSTANT = eV_A  #: k_e in eV·Å/e²

Method = Literal["auto", "direct", "ewald", "pme"]

#: Above this many atoms "auto" switches from Ewald (O(n²)-ish in k-space) to PME.
PME_ABOVE = 2000


def _as_tensor(x, dtype: torch.dtype, device) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _pair_widths(sigma: torch.Tensor | None, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor | None:
    if sigma is None:
        return None
    return torch.sqrt(sigma[i] ** 2 + sigma[j] ** 2)


def _direct(positions: torch.Tensor, charges: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """Sum over the n(n-1)/2 pairs of a finite system."""
    n = positions.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=positions.device)
    r = torch.linalg.vector_norm(positions[j] - positions[i], dim=-1)  # [pairs]
    kernel = 1.0 / r
    s = _pair_widths(sigma, i, j)
    if s is not None:
        kernel = torch.erf(r / (math.sqrt(2.0) * s)) / r
    return COULOMB_CONSTANT * torch.sum(charges[i] * charges[j] * kernel)


def _half_neighbours(positions: np.ndarray, cell: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each periodic pair within ``cutoff`` once (i<j, or i==j for an atom and its image, one of ±S)."""
    i, j, S = neighbour_list("ijS", positions=positions, cell=cell, pbc=[True, True, True], cutoff=cutoff)
    first_nonzero = np.where(S[:, 0] != 0, S[:, 0], np.where(S[:, 1] != 0, S[:, 1], S[:, 2]))
    keep = (i < j) | ((i == j) & (first_nonzero > 0))
    return i[keep], j[keep], S[keep]


def ewald_parameters(cutoff: float, accuracy: float) -> tuple[float, float, float]:
    """torch-pme smearing, Ewald k-space wavelength and PME mesh spacing (Å) for a real-space
    ``cutoff`` (Å) and a relative ``accuracy`` (the Gaussian tails erfc and exp(-k²s²/2)
    fall to ``accuracy`` at the cutoffs). Checked against Madelung constants and pymatgen."""
    x = math.sqrt(-math.log(accuracy))
    smearing = cutoff / (math.sqrt(2.0) * x)
    k_max = math.sqrt(2.0) * x / smearing  # exp(-k²s²/2) = accuracy
    # torch-pme's Ewald grid holds ns = ceil(2π|a|/λ / 2π) points per direction, FFT-style
    # (-ns/2 .. ns/2), so the largest k it sums is π/λ, half of 2π/λ: ask for λ = π/k_max.
    wavelength = math.pi / k_max
    # PME: a mesh twice as fine as that, with 5-point interpolation, keeps the interpolation
    # error below the requested accuracy (measured on 2x2x2 to 3x3x3 NaCl supercells).
    return smearing, wavelength, wavelength / 2.0


def _periodic(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    sigma: torch.Tensor | None,
    method: Method,
    cutoff: float,
    accuracy: float,
) -> torch.Tensor:
    i, j, S = _half_neighbours(positions.detach().cpu().numpy(), cell.detach().cpu().numpy(), cutoff)
    i_t = torch.as_tensor(i, device=positions.device)
    j_t = torch.as_tensor(j, device=positions.device)
    shifts = torch.as_tensor(S, dtype=positions.dtype, device=positions.device) @ cell
    r = torch.linalg.vector_norm(positions[j_t] - positions[i_t] + shifts, dim=-1)  # [pairs]

    smearing, wavelength, mesh = ewald_parameters(cutoff, accuracy)
    potential = CoulombPotential(smearing=smearing).to(dtype=positions.dtype, device=positions.device)
    if method == "auto":
        method = "pme" if positions.shape[0] > PME_ABOVE else "ewald"
    if method == "ewald":
        calculator = EwaldCalculator(potential, lr_wavelength=wavelength)
    else:
        calculator = PMECalculator(potential, mesh_spacing=mesh, interpolation_nodes=5)
    calculator = calculator.to(dtype=positions.dtype, device=positions.device)
    phi = calculator(
        charges=charges[:, None],
        cell=cell,
        positions=positions,
        neighbor_indices=torch.stack([i_t, j_t], dim=1),
        neighbor_distances=r,
    )  # [n, 1] e/Å; torch-pme's potentials carry the 1/2 of the pair sum: E = Σ q_i φ_i
    energy = COULOMB_CONSTANT * torch.sum(charges * phi[:, 0])
    s = _pair_widths(sigma, i_t, j_t)
    if s is not None:
        # Gaussian clouds: remove the short-ranged erfc(r/(√2σ_ij))/r from every point pair.
        energy = energy - COULOMB_CONSTANT * torch.sum(charges[i_t] * charges[j_t] * torch.erfc(r / (math.sqrt(2.0) * s)) / r)
    return energy


def coulomb_energy(
    positions,
    charges,
    cell=None,
    pbc: bool | None = None,
    sigma=None,
    *,
    method: Method = "auto",
    cutoff: float | None = None,
    accuracy: float = 1e-6,
) -> torch.Tensor:
    """Electrostatic energy (eV) of point (``sigma=None``) or Gaussian charges.

    positions (n, 3) Å; charges (n,) e; cell (3, 3) Å, rows are lattice vectors; pbc: periodic
    in all three directions (default: True when a non-zero cell is given); sigma: Gaussian
    width(s) in Å, a number or (n,). ``method``: "direct" (finite systems), "ewald" or
    "pme" (periodic), "auto" picks. ``cutoff`` (Å): real-space cutoff of periodic sums
    (default max(8, 6·√2·σ_max)); ``accuracy``: relative accuracy of the periodic sums.
    Tensors keep their autograd graph: forces are ``-grad(E, positions)``.
    """
    ref = next((x for x in (positions, charges, cell) if isinstance(x, torch.Tensor)), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float64
    device = ref.device if ref is not None else "cpu"
    positions = _as_tensor(positions, dtype, device)
    charges = _as_tensor(charges, dtype, device).reshape(-1)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (n, 3), got {tuple(positions.shape)}")
    if charges.shape[0] != positions.shape[0]:
        raise ValueError(f"{positions.shape[0]} positions but {charges.shape[0]} charges")
    if sigma is not None:
        sigma = _as_tensor(sigma, dtype, device)
        sigma = sigma.expand(positions.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)
        if torch.any(sigma <= 0):
            raise ValueError("Gaussian widths sigma must be positive (use sigma=None for point charges)")
    if cell is not None:
        cell = _as_tensor(cell, dtype, device)
    if pbc is None:
        pbc = cell is not None and bool(torch.any(cell != 0))
    if not pbc:
        if method not in ("auto", "direct"):
            raise ValueError(f"method {method!r} needs a periodic cell; finite systems use 'direct'")
        return _direct(positions, charges, sigma)
    if cell is None or torch.abs(torch.linalg.det(cell)) < 1e-9:
        raise ValueError("a periodic system needs a cell with non-zero volume")
    if method == "direct":
        raise ValueError("method 'direct' is for finite systems; periodic ones use 'ewald' or 'pme'")
    if cutoff is None:
        cutoff = max(8.0, 6.0 * math.sqrt(2.0) * float(sigma.max())) if sigma is not None else 8.0
    return _periodic(positions, charges, cell, sigma, method, float(cutoff), float(accuracy))
