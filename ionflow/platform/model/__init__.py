"""The MLIP: a committee of MACE networks with uncertainty, its file format and ASE calculator."""

from __future__ import annotations

from ionflow.platform.model.calculator import CommitteeCalculator, load_calculator
from ionflow.platform.model.committee import Committee, ModelSpec
from ionflow.platform.model.files import load_model, save_model
from ionflow.platform.model.graph import build_batch

__all__ = [
    "Committee",
    "CommitteeCalculator",
    "ModelSpec",
    "build_batch",
    "load_calculator",
    "load_model",
    "save_model",
]
