"""The shallow ensemble (one backbone, K heads, Gaussian NLL) and the fitted calibration of the spreads."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from ionflow.config import ModelConfig, TrainingConfig
from ionflow.platform.dataset import label_batches
from ionflow.platform.evaluation import calibrate, evaluate
from ionflow.platform.loss import LossWeights, backward, batch_loss, head_parameters
from ionflow.platform.model import ShallowEnsemble, build_batch, build_ensemble, load_calculator, load_model, save_model
from ionflow.platform.model.ensemble import ModelSpec
from ionflow.platform.settings import ModelSettings
from ionflow.platform.training import new_spec, train_ensemble

FAST = dict(learning_rate=2e-2, batch_size=16, energy_weight=10.0, forces_weight=1.0)


def shallow_model(k: int = 4, electrostatics: str = "equilibrated", uncertainty: str = "shallow") -> ModelSettings:
    return ModelConfig(
        uncertainty=uncertainty,
        ensemble_size=k,
        hidden_irreps="8x0e+8x1o",
        mlp_irreps="8x0e",
        num_interactions=2,
        electrostatics=electrostatics,
    ).settings()


@pytest.fixture(scope="module")
def shallow_trained(h3o_labelled):
    """Shallow ensemble (4 heads) trained 60 epochs on 10 H3O+ frames; 2 for validation, 4 held out."""
    train, valid, test = h3o_labelled[:10], h3o_labelled[10:12], h3o_labelled[12:]
    model, report = train_ensemble(train, valid, shallow_model(), TrainingConfig(epochs=60, **FAST).settings(), seed=3)
    return model, report, train, valid, test


def test_one_backbone_with_k_heads(h3o_labelled):
    model = build_ensemble(new_spec(h3o_labelled, shallow_model(k=5), seed=1))
    assert isinstance(model, ShallowEnsemble)
    assert model.member.heads == 5 and model.size == 5
    out = model(build_batch(h3o_labelled[:3], model.z_table, model.r_max))
    assert out["energy"].shape == (5, 3) and out["forces"].shape == (5, 12, 3)
    assert out["charges"].shape == (1, 12), "the heads share one charge model"
    assert torch.allclose(
        out["energy"].mean(0), model.member(build_batch(h3o_labelled[:3], model.z_table, model.r_max))["energy"]
    )
    assert out["energy"].std(0).min() > 0, "the heads start apart"
    committee_params = sum(
        p.numel()
        for p in build_ensemble(new_spec(h3o_labelled, shallow_model(5, uncertainty="committee"), 1)).parameters()
    )
    assert sum(p.numel() for p in model.parameters()) < 0.25 * committee_params


def test_environments_come_from_the_one_backbone_or_the_first_member(h3o_labelled):
    batch_frames = h3o_labelled[:2]
    for kind in ("shallow", "committee"):
        model = build_ensemble(new_spec(h3o_labelled, shallow_model(k=3, uncertainty=kind), seed=1))
        first = model.member if kind == "shallow" else model.members[0]
        assert model.first_member is first
        batch = build_batch(batch_frames, model.z_table, model.r_max)
        features = model.environments(batch)
        assert features.shape[0] == 8 and not features.requires_grad
        assert torch.equal(features, first.environments(batch))


def test_spreads_follow_their_definitions_and_the_calibration(h3o_labelled):
    model = build_ensemble(new_spec(h3o_labelled, shallow_model(k=4), seed=2)).eval()
    batch = build_batch(h3o_labelled[:2], model.z_table, model.r_max)
    out = model(batch)
    e, f = out["energy"].detach(), out["forces"].detach()
    raw = model.predict(batch)
    assert torch.allclose(raw["energy_std"], e.std(0, unbiased=False))
    assert torch.allclose(raw["force_std"], ((f - f.mean(0)) ** 2).sum(-1).mean(0).sqrt())
    assert torch.allclose(raw["forces"], f.mean(0))
    model.spec.calibration = {"energy": 3.0, "forces": 0.5}
    scaled = model.predict(batch)
    assert torch.allclose(scaled["energy_std"], 3.0 * raw["energy_std"])
    assert torch.allclose(scaled["force_std"], 0.5 * raw["force_std"])
    assert torch.equal(scaled["forces"], raw["forces"]) and torch.equal(scaled["energy"], raw["energy"])


def test_nll_reaches_only_the_heads(h3o_labelled):
    spec = new_spec(h3o_labelled, shallow_model(k=3), seed=4)
    model = build_ensemble(spec)
    batch = label_batches(h3o_labelled[:4], model.spec, batch_size=8)[0]
    mse_only = LossWeights(energy=1.0, forces=1.0)
    with_nll = LossWeights(energy=1.0, forces=1.0, nll=1.0)

    def gradients(weights):
        model.zero_grad(set_to_none=True)
        backward(model, batch, weights)
        return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}

    plain, nll = gradients(mse_only), gradients(with_nll)
    heads = {id(p) for p in head_parameters(model)}
    changed = []
    for name, p in model.named_parameters():
        if plain[name] is None:
            continue
        same = torch.allclose(plain[name], nll[name], rtol=1e-12, atol=1e-15)
        if id(p) in heads:
            changed.append(not same)
        else:
            assert same, f"the NLL changed the gradient of the shared parameter {name}"
    assert any(changed), "the NLL did not reach the heads"
    loss, term = batch_loss(model, batch, with_nll, training=False)
    assert term is not None and torch.isfinite(term)


def test_force_nll_through_the_deviations_is_the_nll_of_every_heads_forces(h3o_labelled):
    """The NLL's variance is taken from F_k − F̄ computed without F̄ (cheaper: no path back through
    the mean force's graph): same values, and the same gradient as the variance of the F_k."""
    from ionflow.platform.loss import FORCES_VARIANCE_FLOOR, gaussian_nll

    model = build_ensemble(new_spec(h3o_labelled, shallow_model(k=3), seed=5))
    batch = label_batches(h3o_labelled[:4], model.spec, batch_size=8)[0]
    out = model(batch, training=True)
    assert torch.allclose(out["forces_deviation"], out["forces"] - out["forces_mean"], atol=1e-12)
    assert "forces_deviation" not in model(batch, training=True, head_forces=False)
    heads = head_parameters(model)
    ref = batch["ref_forces"]
    plain = gaussian_nll(out["forces"], ref, FORCES_VARIANCE_FLOOR)
    apart = gaussian_nll(out["forces"], ref, FORCES_VARIANCE_FLOOR, deviation=out["forces_deviation"])
    assert torch.allclose(plain, apart, rtol=1e-12)

    def grads(nll):  # a head's last bias does not move its forces: no gradient
        found = torch.autograd.grad(nll, heads, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(heads, found)]

    for g1, g2 in zip(grads(plain), grads(apart)):
        assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-14)
    assert any(float(g.abs().max()) > 0 for g in grads(apart))


def test_shallow_training_lowers_errors_and_calibrates(shallow_trained, h3o_labelled):
    model, report, train, valid, test = shallow_trained
    before = evaluate(build_ensemble(new_spec(train, shallow_model(), seed=3)).eval(), test)
    after = evaluate(model, test)
    assert after["energy_rmse"] < 0.5 * before["energy_rmse"], (before, after)
    assert after["forces_rmse"] < 0.75 * before["forces_rmse"], (before, after)
    assert report.best_epoch >= 60 // 4, "the best weights are chosen once the NLL is on"
    # the calibration is the maximum-likelihood scale on the validation frames: there the
    # calibrated spread predicts the RMS error exactly
    assert evaluate(model, valid)["force_z_rms"] == pytest.approx(1.0, rel=1e-9)
    assert model.spec.calibration == pytest.approx(calibrate(copy.deepcopy(model), valid))
    assert 0.2 < after["force_z_rms"] < 5.0, after


def test_nll_trains_the_heads_apart(shallow_trained):
    model, _, train, valid, _ = shallow_trained
    flat, _ = train_ensemble(
        train, valid, shallow_model(), TrainingConfig(epochs=60, nll_weight=0.0, **FAST).settings(), seed=3
    )

    def raw_spread(m):
        m = copy.deepcopy(m)
        m.spec.calibration = {"energy": 1.0, "forces": 1.0}
        return evaluate(m, valid)["force_std_mean"]

    # without the NLL the heads keep their random start: a tiny spread that the calibration must inflate
    assert raw_spread(model) > 2 * raw_spread(flat)
    assert model.spec.calibration["forces"] < flat.spec.calibration["forces"]


def test_calibration_of_a_committee(trained):
    committee, _, _, valid, _ = trained
    assert evaluate(committee, valid)["force_z_rms"] == pytest.approx(1.0, rel=1e-9)
    assert all(v > 0 for v in committee.spec.calibration.values())


class _Wider:
    """An ensemble whose members deviate from their mean ``factor`` times as much as ``inner``'s."""

    def __init__(self, inner, factor: float) -> None:
        self.inner, self.factor = inner, factor
        self.spec, self.z_table, self.r_max, self.device = inner.spec, inner.z_table, inner.r_max, inner.device

    def predict(self, batch):
        out = dict(self.inner.predict(batch))
        for key in ("energies", "forces_members"):
            mean = out[key].mean(0, keepdim=True)
            out[key] = mean + self.factor * (out[key] - mean)
        return out


def test_calibrate_scales_inversely_with_the_spread(shallow_trained):
    model, _, _, valid, _ = shallow_trained
    factors = calibrate(model, valid)
    wider = calibrate(_Wider(model, 2.0), valid)
    assert wider["forces"] == pytest.approx(factors["forces"] / 2, rel=1e-9)
    assert wider["energy"] == pytest.approx(factors["energy"] / 2, rel=1e-9)


def test_shallow_model_file_round_trip(shallow_trained, h3o, tmp_path):
    model, *_ = shallow_trained
    path = save_model(model, tmp_path / "shallow.pt")
    loaded = load_model(path)
    assert isinstance(loaded, ShallowEnsemble)
    assert loaded.spec.calibration == model.spec.calibration
    batch = build_batch([h3o], model.z_table, model.r_max)
    a, b = model.predict(batch), loaded.predict(batch)
    for key in ("energy", "forces", "energy_std", "force_std", "charges"):
        assert torch.equal(a[key], b[key]), key
    calc = load_calculator(path)
    atoms = h3o.copy()
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(float(a["energy"][0]))
    assert np.allclose(calc.get_property("forces_uncertainty", atoms), a["force_std"].numpy())


def test_unknown_uncertainty_kind_is_refused():
    hyper = {**dataclasses.asdict(shallow_model()), "uncertainty": "dropout"}
    spec = ModelSpec(hyper=hyper, z_table=[1, 8], atomic_energies=[0.0, 0.0])
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        build_ensemble(spec)
