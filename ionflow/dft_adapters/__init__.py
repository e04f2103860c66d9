"""Reference calculators behind one protocol (:class:`ReferenceAdapter`).

Adapters are looked up by name so that a campaign file can say ``adapter: pyscf`` with a
``settings:`` mapping; each adapter module is imported only when it is asked for, so a
campaign that uses tblite does not pay for importing PySCF.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pydantic import BaseModel

from ionflow.dft_adapters.base import LabelResult, ReferenceAdapter, SettingError, settings_hash

__all__ = [
    "ADAPTER_NAMES",
    "LabelResult",
    "ReferenceAdapter",
    "SettingError",
    "get_adapter",
    "settings_hash",
    "settings_model",
]

#: name -> (module, adapter class, settings class)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "pyscf": ("ionflow.dft_adapters.pyscf_adapter", "PySCFAdapter", "PySCFSettings"),
    "tblite": ("ionflow.dft_adapters.tblite_adapter", "TBLiteAdapter", "TBLiteSettings"),
    "ase": ("ionflow.dft_adapters.ase_adapter", "ASEAdapter", "ASESettings"),
}

ADAPTER_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: str) -> tuple[Any, str, str]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown reference adapter {name!r}; known adapters: {', '.join(ADAPTER_NAMES)}")
    module, adapter_cls, settings_cls = _REGISTRY[name]
    return import_module(module), adapter_cls, settings_cls


def settings_model(name: str) -> type[BaseModel]:
    """The pydantic model that validates the ``settings`` of adapter ``name`` (unknown keys rejected)."""
    module, _, settings_cls = _lookup(name)
    return getattr(module, settings_cls)


def get_adapter(
    name: str, settings: dict[str, Any] | None = None, timeout_s: float | None = None, num_threads: int | None = None
) -> ReferenceAdapter:
    """A ready adapter ``name`` with validated ``settings`` (defaults when None).

    ``timeout_s`` and ``num_threads`` go to adapters that run each calculation in a child
    process of their own (``isolated``), which enforce them; for the others the labelling
    pool (:mod:`ionflow.dft_adapters.pool`) enforces them on its worker processes.
    """
    module, adapter_cls, settings_cls = _lookup(name)
    cls = getattr(module, adapter_cls)
    settings_obj = getattr(module, settings_cls)(**(settings or {}))
    if getattr(cls, "isolated", False):
        return cls(settings_obj, timeout_s=timeout_s, num_threads=num_threads)
    return cls(settings_obj)
