"""Charge equilibration: exact totals per structure and per spin channel, differentiable, invariant."""

from __future__ import annotations

import pytest
import torch

from ionflow.platform.model.charges import dipole, equilibrate, equilibrate_spin, spin_targets


def _batch():
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    targets = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    return batch, targets


@pytest.mark.parametrize("fukui", [True, False], ids=["fukui", "uniform"])
def test_charges_sum_exactly_to_each_structures_total(fukui):
    torch.manual_seed(0)
    batch, targets = _batch()
    raw = torch.randn(8, dtype=torch.float64) * 3
    weights = torch.randn(8, dtype=torch.float64) * 4 if fukui else None
    q = equilibrate(raw, weights, batch, targets)
    sums = torch.zeros(3, dtype=torch.float64).index_add_(0, batch, q)
    assert torch.allclose(sums, targets, atol=1e-12)


def test_float32_charges_also_add_up_to_1e_6():
    torch.manual_seed(1)
    batch = torch.zeros(500, dtype=torch.long)
    raw = torch.randn(500) * 2
    q = equilibrate(raw, torch.randn(500), batch, torch.tensor([-3.0]))
    assert abs(float(q.double().sum()) + 3.0) < 1e-6 * 500


def test_uniform_weights_shift_every_atom_equally():
    batch, targets = _batch()
    raw = torch.randn(8, dtype=torch.float64)
    q = equilibrate(raw, None, batch, targets)
    shift = q - raw
    assert torch.allclose(shift[:3], shift[0].expand(3)) and torch.allclose(shift[3:7], shift[3].expand(4))


def test_extra_charge_goes_where_the_fukui_weight_is_large():
    batch = torch.zeros(3, dtype=torch.long)
    raw = torch.zeros(3, dtype=torch.float64)
    weights = torch.tensor([10.0, -10.0, -10.0], dtype=torch.float64)
    q = equilibrate(raw, weights, batch, torch.tensor([-1.0], dtype=torch.float64))
    assert q[0] < -0.99 and abs(float(q[1])) < 1e-3


def test_spin_channels_match_charge_and_multiplicity():
    torch.manual_seed(2)
    batch, _ = _batch()
    total = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    mult = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)
    q, s = equilibrate_spin(
        torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), batch, total, mult
    )
    q_sum = torch.zeros(3, dtype=torch.float64).index_add_(0, batch, q)
    s_sum = torch.zeros(3, dtype=torch.float64).index_add_(0, batch, s)
    assert torch.allclose(q_sum, total, atol=1e-12)
    assert torch.allclose(s_sum, mult - 1, atol=1e-12)
    assert torch.allclose(spin_targets(total, mult).sum(-1), total)


def test_equilibrated_charges_are_permutation_equivariant_and_differentiable():
    torch.manual_seed(3)
    batch = torch.zeros(5, dtype=torch.long)
    raw = torch.randn(5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0], dtype=torch.float64)
    q = equilibrate(raw, weights, batch, target)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(equilibrate(raw[perm], weights[perm], batch, target), q[perm])
    assert torch.autograd.gradcheck(lambda r, w: equilibrate(r, w, batch, target), (raw, weights))


def test_dipole_of_a_neutral_pair_is_charge_times_separation_and_origin_free():
    batch = torch.zeros(2, dtype=torch.long)
    q = torch.tensor([0.5, -0.5], dtype=torch.float64)
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    masses = torch.tensor([1.0, 3.0], dtype=torch.float64)
    mu = dipole(q, pos, masses, batch, 1)
    assert torch.allclose(mu, torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64))
    assert torch.allclose(dipole(q, pos + 7.0, masses, batch, 1), mu)
