"""cuEquivariance backbones and a float32 backbone in a float64 member (ionflow.platform.model.kernels).

The conversion tests run wherever cuequivariance is installed: without NVIDIA's compiled ops it runs a
pure-torch fallback, on the CPU, with the same numbers. Tests of the kernels themselves need CUDA.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from ionflow.config import ModelConfig
from ionflow.platform.model import Ensemble, ModelSpec, build_batch, build_ensemble
from ionflow.platform.model.kernels import (
    MixedPrecisionBackbone,
    accelerate,
    accelerate_member,
    backbone_dtype,
    cueq_available,
    cueq_kernels_available,
    is_cueq,
    members,
    restore,
    restore_member,
    set_backbone_dtype,
    to_cueq,
    to_e3nn,
)
from ionflow.platform.model.network import scalar_feature_index

needs_cueq = pytest.mark.skipif(
    not cueq_available(), reason="cuequivariance is not installed (pip install ionflow[gpu])"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_kernels = pytest.mark.skipif(
    not cueq_kernels_available(), reason="NVIDIA's compiled cuequivariance ops are not installed"
)

#: E0 (eV) of the size of real ones: a float32 sum over a crystal's atoms would lose meV
Z_TABLE = [1, 8, 11, 17]
E0 = [-13.6, -2041.8, -4418.9, -12577.3]


def ensemble(uncertainty: str = "committee", correlation: int = 2, mode: str = "equilibrated") -> Ensemble:
    """Two members (or three heads), two layers, l=1 features: every kind of layer the conversion maps."""
    settings = ModelConfig(
        uncertainty=uncertainty,
        ensemble_size=2 if uncertainty == "committee" else 3,
        hidden_irreps="8x0e+8x1o",
        mlp_irreps="8x0e",
        num_interactions=2,
        correlation=correlation,
        electrostatics=mode,
        dtype="float64",
    ).settings()
    spec = ModelSpec(hyper=asdict(settings), z_table=Z_TABLE, atomic_energies=E0, scale=2.0)
    torch.manual_seed(0)
    model = build_ensemble(spec)
    with torch.no_grad():  # random, clearly non-zero heads and weights
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def frames() -> list[Atoms]:
    """A water molecule and a rattled NaCl crystal (periodic: Ewald sum and stress)."""
    water = molecule("H2O")
    crystal = bulk("NaCl", "rocksalt", a=5.64).repeat(2)
    crystal.rattle(0.05, seed=1)
    for atoms in (water, crystal):
        atoms.info.update(charge=0, multiplicity=1)
    return [water, crystal]


def evaluate(model: torch.nn.Module, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Energy, forces and stress of :func:`frames`, on the CPU, detached (a fresh batch each time:
    the backbone marks the positions as requiring gradients)."""
    batch = build_batch(frames(), Z_TABLE, 4.0, dtype=torch.float64, device=device)
    out = model(batch, compute_stress=True)
    return {key: value.detach().cpu() for key, value in out.items()}


def assert_close(got: dict, want: dict, atol: float, keys=("energy", "forces", "stress", "charges")) -> None:
    for key in keys:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def test_accelerate_member_leaves_a_cpu_member_alone():
    model = ensemble()
    member = model.first_member
    backbone = member.backbone
    assert accelerate_member(member, "cpu") is member
    assert member.backbone is backbone and not is_cueq(member.backbone)


@needs_cueq
@pytest.mark.parametrize("correlation", [2, 3])
def test_cueq_backbone_predicts_what_the_e3nn_one_does(correlation):
    model = ensemble(correlation=correlation)
    want = evaluate(model)
    fast = copy.deepcopy(model)
    member = fast.first_member  # the other stays e3nn (on the CPU, the fallback's conversion takes seconds)
    member.backbone = to_cueq(member.backbone)
    assert is_cueq(member.backbone) and not is_cueq(members(fast)[1].backbone)
    assert torch.get_default_dtype() == torch.float32  # the conversion put torch's default back
    got = evaluate(fast)
    assert want["forces"].abs().max() > 0.1 and want["stress"].abs().max() > 1e-4  # not trivially zero
    assert_close(got, want, atol=1e-8)


@needs_cueq
def test_shallow_ensemble_heads_through_cueq():
    model = ensemble("shallow")
    want = evaluate(model)
    model.member.backbone = to_cueq(model.member.backbone)
    got = evaluate(model)
    assert_close(got, want, atol=1e-8)
    assert (want["forces"][0] - want["forces"][1]).abs().max() > 1e-3  # the heads differ


@needs_cueq
def test_e3nn_cueq_e3nn_round_trips_the_state_dict():
    backbone = ensemble().first_member.backbone
    with torch.no_grad():
        backbone.interactions[0].linear_up.weight.mul_(1.5)  # a trained weight is not an initial one
    back = to_e3nn(to_cueq(backbone))
    assert not is_cueq(back) and to_e3nn(back) is back
    before, after = backbone.state_dict(), back.state_dict()
    assert list(after) == list(before)
    parameters = {name for name, _ in backbone.named_parameters()}
    for name, value in before.items():
        assert after[name].shape == value.shape and after[name].dtype == value.dtype, name
        # the weights come back exactly; constant buffers (Clebsch-Gordan and U matrices) are recomputed
        # by the conversion in the model's dtype, where build_member computed them in float32 and cast
        atol = 1e-12 if name in parameters else 1e-6
        torch.testing.assert_close(after[name], value, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@needs_cueq
def test_conversion_keeps_frozen_weights_frozen():
    backbone = ensemble().first_member.backbone
    for name, p in backbone.named_parameters():
        if name.startswith(("node_embedding.", "interactions.0.", "products.0.")):
            p.requires_grad_(False)
    fast = to_cueq(backbone)
    frozen = {name for name, p in fast.named_parameters() if not p.requires_grad}
    assert "products.0.symmetric_contractions.weight" in frozen
    assert "products.1.symmetric_contractions.weight" not in frozen
    assert all(name.startswith(("node_embedding.", "interactions.0.", "products.0.")) for name in frozen)
    back = to_e3nn(fast)
    assert {n for n, p in back.named_parameters() if not p.requires_grad} == {
        n for n, p in backbone.named_parameters() if not p.requires_grad
    }


def test_float32_backbone_keeps_the_energy_sum_and_coulomb_in_float64():
    model = ensemble()
    want = evaluate(model)
    mixed = copy.deepcopy(model)
    for member in members(mixed):
        set_backbone_dtype(member, torch.float32)
        assert isinstance(member.backbone, MixedPrecisionBackbone) and backbone_dtype(member) == torch.float32
        assert member.charge_head[0].weight.dtype == torch.float64  # the heads stay float64
        # code that reads the backbone's modules (freezing layers, feature indices) still finds them
        assert member.backbone.products is member.backbone.inner.products
        assert torch.equal(scalar_feature_index(member.backbone), member.scalars)
    mixed = copy.deepcopy(mixed)
    got = evaluate(mixed)
    for key in ("energy", "forces", "stress", "energy_coulomb"):
        assert got[key].dtype == torch.float64, key
    # the crystal's E0 alone is about -1.4e5 eV: a float32 sum would be off by ~10 meV; float64 E0
    # leaves only the float32 rounding of the interaction energies and features
    assert want["energy"].abs().max() > 1e5
    assert_close(got, want, atol=1e-5)
    for member in members(mixed):
        restore_member(member)
        assert type(member.backbone).__name__ == "ScaleShiftMACE" and backbone_dtype(member) == torch.float64
    assert mixed.state_dict().keys() == model.state_dict().keys()
    assert_close(evaluate(mixed), want, atol=1e-5)  # the weights went through float32


def test_float32_backbone_trains():
    model = ensemble()
    member = set_backbone_dtype(copy.deepcopy(model.first_member), torch.float32)
    batch = build_batch(frames(), Z_TABLE, 4.0)
    out = member(batch, training=True)
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    grads = [p.grad for p in member.backbone.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@needs_cueq
def test_float32_cueq_backbone():
    model = ensemble()
    want = evaluate(model)
    member = model.first_member
    member.backbone = to_cueq(member.backbone)
    set_backbone_dtype(member, torch.float32)  # rebuilds the cuEquivariance layers in float32
    assert is_cueq(member.backbone) and backbone_dtype(member) == torch.float32
    got = evaluate(model)
    torch.testing.assert_close(got["forces"][0], want["forces"][0], rtol=0, atol=1e-5)
    restore_member(member)
    assert not is_cueq(member.backbone) and backbone_dtype(member) == torch.float64


@needs_cuda
@needs_kernels
def test_cuda_kernels_predict_what_e3nn_does():
    model = ensemble()
    want = evaluate(model)
    device = torch.device("cuda")
    fast = copy.deepcopy(model).to(device)
    assert accelerate(fast, device) is fast  # what explore and the zero-shot bootstrap run MD with
    assert all(is_cueq(member.backbone) for member in members(fast))
    assert_close(evaluate(fast, "cuda"), want, atol=1e-7)
    restore(fast)
    assert fast.state_dict().keys() == model.state_dict().keys()


@needs_cuda
@needs_kernels
def test_cuda_kernels_in_float32():
    model = ensemble()
    want = evaluate(model)
    device = torch.device("cuda")
    fast = copy.deepcopy(model).to(device)
    for member in members(fast):
        set_backbone_dtype(member, torch.float32)
        accelerate_member(member, device)
        assert is_cueq(member.backbone) and backbone_dtype(member) == torch.float32
    got = evaluate(fast, "cuda")
    assert got["energy"].dtype == torch.float64
    assert_close(got, want, atol=1e-4)


@needs_cuda
def test_accelerate_member_on_cuda_without_kernels_is_a_no_op():
    if cueq_kernels_available():
        pytest.skip("the compiled kernels are installed")
    member = ensemble().first_member.to("cuda")
    backbone = member.backbone
    assert accelerate_member(member, "cuda").backbone is backbone


def test_training_with_a_float32_backbone_writes_a_float64_e3nn_model(h3o_labelled, tiny_hyper):
    """training.mixed_precision: the backbone trains in float32 (its weights then differ from a
    float64 run's by float32 rounding, not more), the heads, energy sum and Coulomb in float64; the
    model comes back as the e3nn float64 model a file holds."""
    from ionflow.config import TrainingConfig
    from ionflow.platform.settings import ModelSettings
    from ionflow.platform.training import train_ensemble

    train, valid = h3o_labelled[:8], h3o_labelled[8:10]
    runs = {}
    for mixed in (False, True):
        training = TrainingConfig(epochs=3, learning_rate=1e-2, batch_size=8, mixed_precision=mixed).settings()
        runs[mixed], _ = train_ensemble(train, valid, ModelSettings(**tiny_hyper), training, seed=3, device="cpu")
    double, mixed = runs[False].state_dict(), runs[True].state_dict()
    assert double.keys() == mixed.keys()
    assert all(v.dtype == double[k].dtype for k, v in mixed.items())
    assert not any(is_cueq(m.backbone) or isinstance(m.backbone, MixedPrecisionBackbone) for m in members(runs[True]))
    differences = [float((mixed[k] - v).abs().max()) for k, v in double.items() if v.is_floating_point() and v.numel()]
    assert 0 < max(differences) < 1e-3, max(differences)
    batch = build_batch(h3o_labelled[10:14], runs[True].z_table, runs[True].r_max, dtype=torch.float64)
    got, want = runs[True].predict(dict(batch)), runs[False].predict(dict(batch))
    assert_close(got, want, atol=1e-3, keys=("energy", "forces"))
