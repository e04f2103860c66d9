"""One portable model file: architecture spec + weights, no pickled code.

The file is a ``torch.save`` of plain containers (dicts, lists, numbers, strings,
tensors) and is read back with ``torch.load(weights_only=True)``, which refuses
to unpickle arbitrary objects: opening a model file cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ionflow.platform.model.committee import Ensemble, ModelSpec, build_ensemble

FORMAT = "ionflow-committee"
FORMAT_VERSION = 3  # 2: members carry an electrostatic head; 3: shallow ensembles and calibration


def save_model(committee: Ensemble, path: str | Path) -> Path:
    """Write a committee or shallow ensemble to ``path`` atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": committee.spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in committee.state_dict().items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """Read a model file written by :func:`save_model` (safe: weights only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable ionflow model file: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an ionflow model file (format {payload.get('format')!r})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: model file version {payload.get('format_version')} is not supported (this ionflow "
            f"reads version {FORMAT_VERSION}); retrain the model with this version"
        )
    spec = ModelSpec(**payload["spec"])
    committee = build_ensemble(spec, seeds=spec.seeds)
    committee.load_state_dict(payload["state_dict"])
    committee.eval()
    return committee.to(device)
