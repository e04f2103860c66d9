"""ionflow: active learning of electrostatic machine-learning interatomic potentials."""

from __future__ import annotations

__version__ = "0.1.0"
