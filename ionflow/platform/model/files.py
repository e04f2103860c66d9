"""One portable model file: architecture spec + weights, no pickled code.

The file is a ``torch.save`` of plain containers (dicts, lists, numbers, strings,
tensors) and is read back with ``torch.load(weights_only=True)``, which refuses
to unpickle arbitrary objects: opening a model file cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ionflow.platform.model.ensemble import Ensemble, ModelSpec, build_ensemble

FORMAT = "ionflow-ensemble"
# 2: members carry an electrostatic head; 3: shallow ensembles and calibration;
# 4: the format is named "ionflow-ensemble" (the payload is laid out as in version 3);
# 5: a backbone fine-tuned from a foundation model (spec.backbone, spec.foundation); models without
# one are still written as version 4, which ionflow releases before 5 read
FORMAT_VERSION = 5
_PLAIN_VERSION = 4

#: (format, version) pairs that :func:`load_model` reads; all share version 4's payload layout.
READABLE = {(FORMAT, FORMAT_VERSION), (FORMAT, _PLAIN_VERSION), ("ionflow-committee", 3)}


def save_model(ensemble: Ensemble, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write a committee or shallow ensemble to ``path`` atomically (a crash never leaves half a file).

    ``provenance`` (plain strings and numbers: campaign, version, parent, training-set hash, ...)
    travels in the file, so a model copied away from its campaign still says where it came from
    (:func:`read_provenance`); the ionflow version that wrote it is always added."""
    from ionflow import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = ensemble.spec
    recorded = {**(provenance or {}), "ionflow_version": __version__}
    if spec.foundation is not None:  # the file it was fine-tuned from, in every copy of the model
        recorded.update(foundation=spec.foundation["path"], foundation_sha256=spec.foundation["sha256"])
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if spec.backbone is not None else _PLAIN_VERSION,
        "spec": spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ensemble.state_dict().items()},
        "provenance": recorded,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_provenance(path: str | Path) -> dict[str, Any]:
    """Where the model in ``path`` came from, as :func:`save_model` recorded it (``{}`` for files
    written before ionflow kept it); read safely (weights only), no model is built."""
    payload = _payload(Path(path), "cpu")
    return dict(payload.get("provenance") or {})


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """Read a model file written by :func:`save_model`, or by ionflow's version-3 format (safe: weights only)."""
    payload = _payload(Path(path), device)
    spec = ModelSpec(**payload["spec"])
    ensemble = build_ensemble(spec, seeds=spec.seeds)
    ensemble.load_state_dict(payload["state_dict"])
    ensemble.eval()
    return ensemble.to(device)


def _payload(path: Path, device: str | torch.device) -> dict[str, Any]:
    """The checked contents of a model file."""
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable ionflow model file: {exc}") from None
    formats = {name for name, _ in READABLE}
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        raise ValueError(f"{path} is not an ionflow model file (format {payload.get('format')!r})")
    if (payload["format"], payload.get("format_version")) not in READABLE:
        raise ValueError(
            f"{path}: model file version {payload.get('format_version')} of format {payload['format']!r} is not "
            f"supported (this ionflow reads version {FORMAT_VERSION}, and version 3 of 'ionflow-committee'); "
            "retrain the model with this version"
        )
    return payload
