"""ionflow: active learning of electrostatic machine-learning interatomic potentials."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_calculator"]

if TYPE_CHECKING:
    from ionflow.platform.model.calculator import load_calculator


def __getattr__(name: str) -> Any:
    # torch, e3nn and MACE load only when a model is asked for: `import ionflow` stays cheap.
    if name == "load_calculator":
        from ionflow.platform.model.calculator import load_calculator

        return load_calculator
    raise AttributeError(f"module 'ionflow' has no attribute {name!r}")
