"""Shared fixtures: a tiny float64 MACE committee and H3O+ frames labelled with real GFN2-xTB."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from ionflow.config import ModelConfig
from ionflow.dft_adapters import get_adapter
from ionflow.platform.model import Committee, ModelSpec
from ionflow.platform.structures import labelled_copy, rattled
from tests.structures import hydronium


@pytest.fixture
def h3o() -> Atoms:
    """A fresh H3O+ (charge +1, singlet) for each test."""
    return hydronium()


@pytest.fixture(scope="session")
def tiny_hyper() -> dict:
    """ModelConfig defaults, shrunk: 2 members, 8 channels, 2 interactions, float64."""
    return ModelConfig(
        ensemble_size=2, hidden_irreps="8x0e+8x1o", mlp_irreps="8x0e", num_interactions=2, dtype="float64"
    ).hyper()


@pytest.fixture(scope="session")
def tiny_spec(tiny_hyper) -> ModelSpec:
    """Architecture for H and O with plausible E0 (eV); weights come from the seeds."""
    return ModelSpec(hyper=dict(tiny_hyper), z_table=[1, 8], atomic_energies=[-10.7, -114.0], seeds=[11, 12])


@pytest.fixture(scope="session")
def untrained_committee(tiny_spec) -> Committee:
    """Randomly initialised committee: a smooth, non-trivial function for symmetry and derivative checks.

    Session-scoped: tests must not modify it (deep-copy first).
    """
    return Committee(tiny_spec).eval()


@pytest.fixture(scope="session")
def h3o_labelled() -> list[Atoms]:
    """16 rattled H3O+ frames (0.1 Å) with REF_energy / REF_forces from tblite GFN2-xTB."""
    frames = rattled(hydronium(), n=16, stdev=0.1, seed=7)
    results = get_adapter("tblite").label(frames)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return [labelled_copy(a, r.energy, r.forces) for a, r in zip(frames, results)]


@pytest.fixture(scope="session")
def trained(h3o_labelled, tiny_hyper):
    """A committee trained for 60 epochs on 10 labelled frames (2 for validation, 4 held out).

    Returns ``(committee, report, train, valid, test)``. Session-scoped: do not modify.
    """
    from ionflow.config import TrainingConfig
    from ionflow.platform.settings import ModelSettings
    from ionflow.platform.training import train_ensemble

    train, valid, test = h3o_labelled[:10], h3o_labelled[10:12], h3o_labelled[12:]
    training = TrainingConfig(
        epochs=60, learning_rate=2e-2, batch_size=16, energy_weight=10.0, forces_weight=1.0
    ).settings()
    committee, report = train_ensemble(train, valid, ModelSettings(**tiny_hyper), training, seed=3)
    return committee, report, train, valid, test


@pytest.fixture(scope="session")
def foundation_pretraining() -> list[Atoms]:
    """The foundation's own training data (:func:`tests.foundation.pretraining_frames`, GFN2-xTB)."""
    from tests.foundation import pretraining_frames

    return pretraining_frames()


@pytest.fixture(scope="session")
def foundation_file(tmp_path_factory, foundation_pretraining):
    """A small mace-torch foundation model file (:func:`tests.foundation.make_foundation`). Do not modify."""
    from tests.foundation import make_foundation

    return make_foundation(tmp_path_factory.mktemp("foundation") / "small.model", foundation_pretraining)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
