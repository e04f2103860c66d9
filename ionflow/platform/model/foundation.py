"""Foundation models: a mace-torch model file (MACE-MP-0, MACE-OFF, or one trained with
``mace_run_train``) as the backbone of an ionflow model.

Such a file is a pickle of the whole ``torch.nn.Module``: reading it runs code the file names,
so :func:`read_foundation` unpickles only a path the user gave explicitly (``model.foundation``,
``ionflow train --foundation``), after checking its sha256 against ``expected_sha256`` when one is
given, and records that sha256. What ionflow keeps of it is plain data: the architecture as a
dict of strings and numbers (:func:`backbone_config`) and the weights as tensors, so the models
fine-tuned from it are ionflow model files, read back without unpickling (``weights_only``).

Only ``ScaleShiftMACE`` files are read (the class every MACE foundation model ships as). The
element table is the foundation's; a multi-head file contributes its first head (its
``atomic_energies`` row 0, the one ``ScaleShiftMACE`` evaluates when a batch names no head).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ionflow.platform.model.mace_blocks import ScaleShiftMACE, interaction_classes, o3

#: What a user is told before a foundation file is unpickled.
UNPICKLING_NOTE = (
    "a mace-torch model file is a Python pickle: reading it runs code named in the file, so load "
    "only files from a source you trust (pin it with model.foundation_sha256)"
)

_GATES = {"silu": torch.nn.functional.silu, "tanh": torch.tanh, "relu": torch.nn.functional.relu, "None": None}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Foundation:
    """A foundation model read from its file: where it came from, its architecture and weights.

    ``config`` is :func:`backbone_config` of the model (plain data), ``state_dict`` its weights
    (CPU tensors, e3nn layout), ``z_table`` its elements (atomic numbers, in its one-hot order),
    ``atomic_energies`` its E0 (eV) in that order, ``r_max`` its cutoff (Å)."""

    path: str
    sha256: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @property
    def z_table(self) -> list[int]:
        return [int(z) for z in self.config["atomic_numbers"]]

    @property
    def atomic_energies(self) -> list[float]:
        return [float(e) for e in self.config["atomic_energies"]]

    @property
    def r_max(self) -> float:
        return float(self.config["r_max"])

    def record(self) -> dict[str, Any]:
        """What a model fine-tuned from it keeps (``ModelSpec.foundation``): path, sha256, E0."""
        return {"path": self.path, "sha256": self.sha256, "atomic_energies": self.atomic_energies}

    def missing_elements(self, numbers: set[int]) -> list[int]:
        """Atomic numbers among ``numbers`` that the foundation has no embedding for."""
        return sorted(set(numbers) - set(self.z_table))


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def backbone_config(model: torch.nn.Module) -> dict[str, Any]:
    """The constructor arguments of a ``ScaleShiftMACE`` as plain data (classes and the gate by
    name, irreps as strings, arrays as lists), as mace-torch's own ``extract_config_mace_model``
    finds them; :func:`build_backbone` builds the model back from it."""
    from mace.tools.scripts_utils import extract_config_mace_model

    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            "the model is a TorchScript (compiled) model, which keeps no architecture to fine-tune: give the "
            "mace-torch model file itself (mace_run_train writes NAME.model next to NAME_compiled.model)"
        )
    if type(model).__name__ != "ScaleShiftMACE":
        raise ValueError(
            f"the model is a {type(model).__name__}; ionflow fine-tunes ScaleShiftMACE models (MACE-MP-0, MACE-OFF, "
            "mace_run_train --model MACE)"
        )
    config = extract_config_mace_model(model)
    if "error" in config:
        raise ValueError(config["error"])
    if config.get("cueq_config") is not None and getattr(config["cueq_config"], "enabled", False):
        raise ValueError("the model uses cuequivariance layers; convert it back to e3nn first (mace_cueq_to_e3nn)")
    plain: dict[str, Any] = {}
    for key, value in config.items():
        if key in ("interaction_cls", "interaction_cls_first", "readout_cls"):
            plain[key] = value.__name__
        elif key == "gate":
            plain[key] = "None" if value is None else value.__name__
        elif key in ("hidden_irreps", "MLP_irreps", "edge_irreps"):
            plain[key] = None if value is None else str(value)
        elif key in ("cueq_config", "embedding_specs"):
            if key == "embedding_specs" and value:
                raise ValueError("the model embeds extra per-structure features (embedding_specs): not supported")
            plain[key] = None
        else:
            plain[key] = _plain(value)
    unknown_gate = plain["gate"] not in _GATES
    if unknown_gate or plain["interaction_cls"] not in interaction_classes:
        raise ValueError(f"unsupported MACE layer: gate {plain['gate']}, interaction {plain['interaction_cls']}")
    plain["avg_num_neighbors"] = float(plain["avg_num_neighbors"])
    energies = np.asarray(plain["atomic_energies"], dtype=float)
    plain["atomic_energies"] = (energies[0] if energies.ndim == 2 else energies).tolist()  # the first head's
    plain["atomic_energies_rows"] = int(energies.shape[0]) if energies.ndim == 2 else 0  # 0: stored as one row, 1-D
    return plain


def build_backbone(config: dict[str, Any], atomic_energies: list[float] | None = None) -> ScaleShiftMACE:
    """A ``ScaleShiftMACE`` with the architecture of :func:`backbone_config`'s ``config`` (random
    weights), with ``atomic_energies`` (eV, the config's order) in place of the config's E0."""
    from mace.modules import blocks

    args = dict(config)
    for key in ("interaction_cls", "interaction_cls_first"):
        args[key] = interaction_classes[args[key]]
    args["readout_cls"] = getattr(blocks, args["readout_cls"])
    args["gate"] = _GATES[args["gate"]]
    for key in ("hidden_irreps", "MLP_irreps", "edge_irreps"):
        args[key] = None if args[key] is None else o3.Irreps(args[key])
    e0 = np.asarray(config["atomic_energies"] if atomic_energies is None else atomic_energies, dtype=float)
    rows = int(args.pop("atomic_energies_rows", 0))
    args["atomic_energies"] = (
        np.tile(e0, (rows, 1)) if rows else e0
    )  # as the file stored them: [heads, elements] or 1-D
    args["atomic_inter_scale"] = np.asarray(args["atomic_inter_scale"], dtype=float)
    args["atomic_inter_shift"] = np.asarray(args["atomic_inter_shift"], dtype=float)
    return ScaleShiftMACE(**args)


def read_foundation(path: str | Path, expected_sha256: str | None = None) -> Foundation:
    """Unpickle the mace-torch model file at ``path`` (see :data:`UNPICKLING_NOTE`: call this only
    with a path the user gave) and keep its architecture and weights as plain data.

    Raises ``ValueError`` naming the problem, before unpickling when the file is missing or its
    sha256 differs from ``expected_sha256``; after, when it is not a ``ScaleShiftMACE``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no foundation model file at {path}")
    sha256 = file_sha256(path)
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        raise ValueError(f"{path} has sha256 {sha256}, not the {expected_sha256} it is pinned to; not loaded")
    try:
        # full unpickling, on purpose: see UNPICKLING_NOTE; the caller passes only user-given paths
        with warnings.catch_warnings():  # a TorchScript file is refused below, with what to give instead
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickles fail in many ways
        raise ValueError(f"{path} is not a readable mace-torch model file: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a mace-torch model")
    config = backbone_config(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # the product blocks' weights come in two layouts (mace's reduced Clebsch-Gordan basis, used when
    # cuequivariance is installed, or the original): keep the one the file's weights fit
    problems = []
    for reduced in (bool(config.get("use_reduced_cg")), not config.get("use_reduced_cg")):
        config["use_reduced_cg"] = reduced
        problem = _weights_problem(build_backbone(config).state_dict(), state)
        if problem is None:
            return Foundation(path=str(path.resolve()), sha256=sha256, config=config, state_dict=state)
        problems.append(problem)
    note = "" if cueq_installed() else " (a file written with cuequivariance installed may need ionflow[gpu])"
    raise ValueError(f"{path}: its weights do not fit the architecture read from it: {problems[0]}{note}")


def cueq_installed() -> bool:
    """Whether mace-torch found cuequivariance (then it builds product blocks in the reduced layout)."""
    from mace.modules import wrapper_ops

    return bool(getattr(wrapper_ops, "CUET_AVAILABLE", False))


def _weights_problem(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """What differs between two state dicts' names and shapes, or None."""
    names = sorted(set(expected) ^ set(state))
    if names:
        return f"weights {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} are in one but not the other"
    for name, tensor in expected.items():
        if tensor.shape != state[name].shape:
            return f"{name} has shape {tuple(state[name].shape)}, the architecture {tuple(tensor.shape)}"
    return None
