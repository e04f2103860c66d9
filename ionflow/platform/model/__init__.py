"""The MLIP: MACE networks with an electrostatic head, ensembled for uncertainty; file format and ASE calculator."""

from __future__ import annotations

from ionflow.platform.model.calculator import CommitteeCalculator, EnsembleCalculator, load_calculator
from ionflow.platform.model.ensemble import Committee, Ensemble, ModelSpec, ShallowEnsemble, build_ensemble
from ionflow.platform.model.files import load_model, read_provenance, save_model
from ionflow.platform.model.graph import build_batch

__all__ = [
    "Committee",
    "CommitteeCalculator",
    "Ensemble",
    "EnsembleCalculator",
    "ModelSpec",
    "ShallowEnsemble",
    "build_ensemble",
    "build_batch",
    "load_calculator",
    "load_model",
    "read_provenance",
    "save_model",
]
