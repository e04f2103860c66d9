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
neutralising background of a charged cell. When all atoms share one width σ (the
model's case) and no ``cutoff`` is given, torch-pme's smearing is set to σ_ij = √2σ
itself: the erfc terms then cancel exactly and the whole energy is the reciprocal-space
sum, with no neighbour list. "auto" picks Ewald or PME by an estimate of their cost;
PME uses FFT-friendly (5-smooth) mesh sizes and 7-point interpolation.
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

#: Interpolation order of PME (points per direction of each atom's stencil).
PME_NODES = 7

#: Default relative accuracy of periodic sums (the Gaussian tails fall to it at the real- and
#: reciprocal-space cutoffs): far below the model's own errors.
ACCURACY = 1e-6

#: Default real-space cutoff (Å) of periodic sums of point charges, and its least value for clouds.
MIN_CUTOFF = 8.0
#: For Gaussian clouds the default real-space cutoff is at least this many pair widths √2·σ_max,
#: where erfc(r/(√2σ)) has fallen far below ``ACCURACY``.
CUTOFF_WIDTHS = 6.0

# Relative costs of PME per mesh point (times log2 of the mesh size) and per atom, against
# Ewald's 1 per k-vector and atom: fitted to timings (see choose_method).
PME_MESH_COST = 3.0 / 8.0
PME_ATOM_COST = 400.0

#: Cell volumes (Å^3) below this are singular: the cell cannot hold a periodic system.
_MIN_CELL_VOLUME = 1e-9


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


def direct_energies(
    positions: torch.Tensor, charges: torch.Tensor, ranges: list[tuple[int, int]], sigma: float | None
) -> torch.Tensor:
    """Energies (len(ranges),) eV of several finite systems at once: the same pair sum as
    ``coulomb_energy`` (method "direct") for each atom range [lo, hi) of ``positions`` and
    ``charges``, with one Gaussian width ``sigma`` (Å) for every atom (None: point charges).
    One vectorised pass instead of a Python loop over structures."""
    device = positions.device
    firsts, seconds, owners = [], [], []
    for g, (lo, hi) in enumerate(ranges):
        i, j = torch.triu_indices(hi - lo, hi - lo, offset=1, device=device)
        firsts.append(i + lo)
        seconds.append(j + lo)
        owners.append(torch.full_like(i, g))
    i, j, owner = torch.cat(firsts), torch.cat(seconds), torch.cat(owners)
    r = torch.linalg.vector_norm(positions[j] - positions[i], dim=-1)  # [pairs]
    kernel = 1.0 / r if sigma is None else torch.erf(r / (2.0 * sigma)) / r  # √2·σ_ij = √2·√2·σ
    pair = COULOMB_CONSTANT * charges[i] * charges[j] * kernel
    return torch.zeros(len(ranges), dtype=positions.dtype, device=device).index_add_(0, owner, pair)


def _half_neighbours(
    positions: np.ndarray, cell: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _fft_size(n: int) -> int:
    """Smallest 5-smooth integer (2^a 3^b 5^c, fast for FFTs) not below ``n``."""
    size = max(1, n)
    while True:
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return size
        size += 1


def mesh_shape(cell: torch.Tensor, mesh_spacing: float) -> list[int]:
    """PME mesh points per lattice direction: torch-pme's own count, 2|a_i|/h + 1 (a mesh of
    spacing h/2), rounded up to a 5-smooth size instead of torch-pme's next power of two,
    which makes a mesh up to 8 times larger than asked for (e.g. 128³ instead of 108³)."""
    lengths = torch.linalg.vector_norm(cell.detach(), dim=1).tolist()
    return [_fft_size(math.ceil(2.0 * a / mesh_spacing + 1.0)) for a in lengths]


class _PME(PMECalculator):
    """torch-pme 0.5's PMECalculator with FFT-friendly (5-smooth) mesh sizes, not powers of 2.

    ``_compute_kspace`` is torch-pme's own with only the mesh size changed (no batching)."""

    def _compute_kspace(self, charges, cell, positions, periodic=None, node_mask=None, kvectors=None):
        if node_mask is not None or kvectors is not None:
            raise ValueError("ionflow's PME takes one system at a time: node_mask and kvectors are not supported")
        ns = torch.tensor(mesh_shape(cell, self.mesh_spacing), device=cell.device)
        self.mesh_interpolator.update(cell, ns)
        self.kspace_filter.update(cell, ns)
        self.mesh_interpolator.compute_weights(positions)
        rho_mesh = self.mesh_interpolator.points_to_mesh(particle_weights=charges)
        potential_mesh = self.kspace_filter.forward(rho_mesh)
        ivolume = torch.abs(cell.det()).pow(-1)
        potential = self.mesh_interpolator.mesh_to_points(potential_mesh) * ivolume
        potential -= charges * self.potential.self_contribution()
        potential -= 2 * self.potential.background_correction() * torch.sum(charges, dim=0) * ivolume
        potential += self.potential.pbc_correction(periodic, positions, cell, charges)
        return potential / 2


def _ewald_kvectors(cell: torch.Tensor, wavelength: float) -> int:
    """How many k-vectors torch-pme's Ewald sums (ceil(|a_i|/λ) per direction)."""
    return math.prod(math.ceil(a / wavelength) for a in torch.linalg.vector_norm(cell.detach(), dim=1).tolist())


def choose_method(cell: torch.Tensor, n_atoms: int, wavelength: float, mesh_spacing: float) -> str:
    """ "ewald" or "pme", whichever is estimated cheaper for energy + forces.

    Ewald costs ~ (k-vectors × atoms), PME ~ (mesh points × log) + (atoms × stencil); the
    weights are rough, from energy+forces timings with torch 2.13 on a 2-core CPU (float64)
    of liquid-density water boxes with 1 Å Gaussian charges: Ewald was faster at 50-370
    atoms, PME at 640 atoms and above (2x at 1000, ~10x at 2000).
    """
    ewald = _ewald_kvectors(cell, wavelength) * n_atoms
    mesh = math.prod(mesh_shape(cell, mesh_spacing))
    pme = PME_MESH_COST * mesh * math.log2(max(mesh, 2)) + PME_ATOM_COST * n_atoms
    return "ewald" if ewald <= pme else "pme"


def _calculator(
    smearing: float, wavelength: float, mesh: float, method: Method, positions: torch.Tensor, cell: torch.Tensor
):
    potential = CoulombPotential(smearing=smearing).to(dtype=positions.dtype, device=positions.device)
    if method == "auto":
        method = choose_method(cell, positions.shape[0], wavelength, mesh)
    if method == "ewald":
        calculator = EwaldCalculator(potential, lr_wavelength=wavelength)
    else:
        calculator = _PME(potential, mesh_spacing=mesh, interpolation_nodes=PME_NODES)
    return calculator.to(dtype=positions.dtype, device=positions.device)


def _uniform_gaussian_potentials(
    positions: torch.Tensor, charges: torch.Tensor, cell: torch.Tensor, width: float, method: Method, accuracy: float
) -> torch.Tensor:
    """torch-pme potentials (n, c) e/Å of c channels of Gaussian charges (n, c) of one width σ,
    all in reciprocal space (see :func:`_periodic_uniform_gaussian`); E = k_e Σ_i q_i φ_i per channel."""
    smearing = math.sqrt(2.0) * width
    k_max = math.sqrt(-2.0 * math.log(accuracy)) / smearing  # exp(-k²s²/2) = accuracy
    wavelength = math.pi / k_max  # see ewald_parameters
    calculator = _calculator(smearing, wavelength, wavelength / 2.0, method, positions, cell)
    empty = torch.zeros((0, 2), dtype=torch.long, device=positions.device)
    return calculator(
        charges=charges,
        cell=cell,
        positions=positions,
        neighbor_indices=empty,
        neighbor_distances=torch.zeros(0, dtype=positions.dtype, device=positions.device),
    )


def _periodic_uniform_gaussian(
    positions: torch.Tensor, charges: torch.Tensor, cell: torch.Tensor, width: float, method: Method, accuracy: float
) -> torch.Tensor:
    """Gaussian charges of one width σ, all in reciprocal space.

    Every pair has σ_ij = √2·σ, and torch-pme's long-range kernel with ``smearing`` s is
    erf(r/(√2 s))/r: with s = σ_ij the reciprocal-space sum (minus its i=j self term and with
    the background of a charged cell) IS the Gaussian-cloud energy over all pairs and images,
    so no real-space neighbour list is needed. The same Ewald identity as the general path
    (point charges by Ewald, minus Σ erfc(r/(√2σ_ij))/r), with torch-pme's smearing put equal
    to σ_ij, where the real-space terms cancel exactly.
    """
    phi = _uniform_gaussian_potentials(positions, charges[:, None], cell, width, method, accuracy)
    return COULOMB_CONSTANT * torch.sum(charges * phi[:, 0])


def periodic_coulomb_matrix(
    positions: torch.Tensor, cell: torch.Tensor, width: float, *, method: Method = "auto", accuracy: float = ACCURACY
) -> torch.Tensor:
    """The symmetric matrix A (n, n) eV/e² with ``coulomb_energy(positions, q, cell, sigma=width)``
    = ½ qᵀ A q for every q: Gaussian charges of one width σ (Å) in a periodic cell, images and the
    neutralising background included, the clouds' self-energy not (A_ii is atom i's interaction
    with its own images). One torch-pme call with n channels, unit charge on one atom each:
    O(n²) memory, for small cells (charge equilibration). Differentiable in positions and cell."""
    eye = torch.eye(positions.shape[0], dtype=positions.dtype, device=positions.device)
    phi = _uniform_gaussian_potentials(positions, eye, cell, width, method, accuracy)  # [n, n] column j: unit q_j
    return COULOMB_CONSTANT * (phi + phi.T)


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
    calculator = _calculator(smearing, wavelength, mesh, method, positions, cell)
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
        energy = energy - COULOMB_CONSTANT * torch.sum(
            charges[i_t] * charges[j_t] * torch.erfc(r / (math.sqrt(2.0) * s)) / r
        )
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
    accuracy: float = ACCURACY,
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
    if cell is None or torch.abs(torch.linalg.det(cell)) < _MIN_CELL_VOLUME:
        raise ValueError("a periodic system needs a cell with non-zero volume")
    if method == "direct":
        raise ValueError("method 'direct' is for finite systems; periodic ones use 'ewald' or 'pme'")
    if cutoff is None and sigma is not None and bool(torch.all(sigma == sigma[0])):
        return _periodic_uniform_gaussian(positions, charges, cell, float(sigma[0]), method, float(accuracy))
    if cutoff is None:
        cutoff = (
            max(MIN_CUTOFF, CUTOFF_WIDTHS * math.sqrt(2.0) * float(sigma.max())) if sigma is not None else MIN_CUTOFF
        )
    return _periodic(positions, charges, cell, sigma, method, float(cutoff), float(accuracy))
