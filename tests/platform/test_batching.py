"""Size-balanced batches (``training.batch_atoms``): every frame once per epoch, batches of about
the same atom count on a mixed dataset, and training on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ionflow.config import TrainingConfig
from ionflow.platform.batching import pack_by_atoms
from ionflow.platform.settings import ModelSettings
from ionflow.platform.training import train_ensemble


def mixed_sizes(seed: int = 0) -> np.ndarray:
    """Small molecules and large cells, as a dataset that mixes them."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(3, 25, 2000), rng.integers(200, 1500, 60)])


def test_every_frame_is_in_one_batch_per_epoch_and_batches_are_balanced():
    sizes = mixed_sizes()
    cap = 3000
    rng = np.random.default_rng(1)
    epochs = [pack_by_atoms(sizes, cap, rng) for _ in range(3)]
    for batches in epochs:
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(len(sizes)))  # every frame exactly once
        atoms = np.array([sizes[b].sum() for b in batches])
        assert atoms.max() <= cap
        # as many batches as the atoms need, all but the last one or two full to within the smallest frame
        assert len(batches) == int(np.ceil(sizes.sum() / cap))
        assert np.sort(atoms)[2:].min() >= cap - sizes.min()
    # frame-count batches of the same mean size differ in cost by far more
    per_batch = int(round(len(sizes) / len(epochs[0])))
    order = np.random.default_rng(2).permutation(len(sizes))
    by_count = [sizes[order[k : k + per_batch]].sum() for k in range(0, len(sizes), per_batch)][:-1]
    assert max(by_count) / min(by_count) > 5
    # the batches change from epoch to epoch; the same seed gives the same batches
    assert epochs[0] != epochs[1]
    assert pack_by_atoms(sizes, cap, np.random.default_rng(1)) == epochs[0]


def test_a_frame_larger_than_the_cap_is_a_batch_of_its_own():
    batches = pack_by_atoms([5, 50, 5, 5], 12)
    assert sorted(map(sorted, batches)) == [[0, 2], [1], [3]]
    with pytest.raises(ValueError, match="max_atoms"):
        pack_by_atoms([3], 0)
    with pytest.raises(ValueError, match="at least one atom"):
        pack_by_atoms([3, 0], 10)


def test_training_on_size_balanced_batches(h3o_labelled, tiny_hyper):
    train, valid = h3o_labelled[:8], h3o_labelled[8:10]
    common = dict(epochs=4, learning_rate=1e-2, energy_weight=10.0, forces_weight=1.0)
    settings = ModelSettings(**tiny_hyper)
    # 4-atom frames, 8 atoms a batch: 4 steps an epoch, like batch_size 2 but packed by atoms
    packed, report = train_ensemble(train, valid, settings, TrainingConfig(batch_atoms=8, **common).settings(), seed=5)
    whole, _ = train_ensemble(train, valid, settings, TrainingConfig(batch_size=32, **common).settings(), seed=5)
    assert np.isfinite(report.train_loss) and np.isfinite(report.valid_loss)
    changed = [k for k, v in packed.state_dict().items() if not torch.equal(v, whole.state_dict()[k])]
    assert changed  # more steps per epoch: other weights than one full batch an epoch
    # a cap above the whole set's atoms is one batch, the same steps as batch_size >= the set
    one, _ = train_ensemble(train, valid, settings, TrainingConfig(batch_atoms=10_000, **common).settings(), seed=5)
    for key, value in one.state_dict().items():
        assert torch.equal(value, whole.state_dict()[key]), key
