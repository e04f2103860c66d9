"""Typed settings of a model and of its training, as the platform reads them.

The campaign file declares every setting once, with its default, range, unit and description
(the ``ModelConfig`` and ``TrainingConfig`` sections of the config module, whose ``settings()``
build these; the platform never imports that module). Here the fields have no defaults: whoever builds a settings object
says every value, so no default is ever written twice. A model file keeps its
:class:`ModelSettings` as a plain dict (``ModelSpec.hyper``); ``ModelSettings(**hyper)`` reads it.

Units: Å (``r_max``, ``charge_width``); the loss weights are in the inverse squared units of
their terms (see :mod:`ionflow.platform.loss`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSettings:
    """Architecture of a model: MACE backbone, electrostatic head and kind of ensemble."""

    uncertainty: str  # "committee" (K members) or "shallow" (one backbone, K readout heads)
    ensemble_size: int  # K: members or heads
    r_max: float  # Å, cutoff radius
    num_interactions: int  # message-passing layers
    hidden_irreps: str  # e3nn irreps of the hidden node features
    mlp_irreps: str  # irreps of the non-linear readout
    max_ell: int  # highest spherical harmonic of the edge attributes
    correlation: int  # body order of the product basis minus one
    num_bessel: int  # radial Bessel functions
    num_polynomial_cutoff: int  # order of the smooth cutoff envelope
    dtype: str  # "float32" or "float64"
    electrostatics: str  # "none", "latent", "equilibrated", "polarisable" or "qeq"
    charge_width: float  # Å, width σ of each atom's Gaussian charge
    polarisation_steps: int  # fixed polarisation updates (polarisable only)

    @property
    def has_electrostatics(self) -> bool:
        """Whether the model predicts charges (and so a dipole)."""
        return self.electrostatics != "none"

    @property
    def shallow(self) -> bool:
        """Whether the ensemble is one backbone with K heads (else K independent members)."""
        return self.uncertainty == "shallow"


@dataclass(frozen=True)
class TrainingSettings:
    """How a model is fitted to its labels."""

    epochs: int  # epochs of a model trained from scratch
    finetune_epochs: int  # epochs of a model refined from its parent
    learning_rate: float  # Adam learning rate from scratch
    batch_size: int  # structures per optimiser step
    energy_weight: float  # (eV/atom)^-2
    forces_weight: float  # (eV/Å)^-2
    charges_weight: float  # e^-2
    dipole_weight: float  # (e·Å)^-2
    valid_fraction: float  # share of labels held out for validation
    finetune_lr_factor: float  # a refinement's learning rate is learning_rate x this
    nll_weight: float  # weight of the shallow ensemble's Gaussian NLL, dimensionless
    batch_atoms: int | None  # atoms per optimiser step (size-balanced batches); None: batch_size frames
    frozen_layers: int  # foundation backbones: embeddings and the first frozen_layers layers keep their weights
    foundation_lr_factor: float  # foundation backbones: their learning rate = the heads' x this
    replay_frames: int  # foundation replay frames drawn per epoch
    replay_weight: float  # weight of the replay loss, dimensionless
    mixed_precision: bool  # a float64 model's backbone computes in float32 while training (and in MD)
    parallel: str  # over N ranks: "data" (shards of each batch), "members" (a committee's), "auto"
