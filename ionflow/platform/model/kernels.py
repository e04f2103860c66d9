"""Faster backbones on GPUs: NVIDIA cuEquivariance kernels and a float32 backbone in a float64 member.

Model files keep one layout: the e3nn backbone that :func:`~ionflow.platform.model.ensemble.build_member`
builds, in the spec's dtype. Everything here changes a member in memory, for a run (training, MD)
on one device, and :func:`restore_member` undoes it before a state dict is saved:

``accelerate_member``
    replaces the e3nn backbone by the same ScaleShiftMACE built from cuEquivariance layers (MACE's
    own conversion, :mod:`mace.cli.convert_e3nn_cueq`): same weights, same energies and forces to
    rounding. It applies only on a CUDA device with NVIDIA's CUDA kernels installed (``pip install
    ionflow[gpu]`` plus ``cuequivariance-ops-torch-cu12`` or ``-cu13`` to match torch's CUDA); else
    the member is returned unchanged. (Without the kernels cuequivariance runs a pure-torch fallback
    that gives the same numbers, on any device, but no faster than e3nn: :func:`to_cueq` uses it in
    the tests.)
``set_backbone_dtype``
    runs the backbone in float32 inside a float64 member (:class:`MixedPrecisionBackbone`): the
    tensor products in float32, the per-atom energies summed in float64 with float64 E0, and the
    charge heads, Coulomb energy and forces (gradients with respect to float64 positions) in float64.

Both keep the member's interface: ``member.backbone(data, ...)`` returns what a ScaleShiftMACE does
(energy, interaction_energy, node_energy, forces when asked, displacement, node_feats). The e3nn
node features are in mul_ir layout, cuEquivariance's in ir_mul; the invariant (0e) channels that
the heads read are at the same columns in both.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator

import torch
from mace.modules import wrapper_ops
from mace.modules.utils import get_symmetric_displacement
from mace.tools.scripts_utils import extract_config_mace_model

from ionflow.platform.model.mace_blocks import ScaleShiftMACE
from ionflow.platform.model.network import Member

#: cuEquivariance's layout of the irreps (MACE's conversion uses it; the fastest kernels need it).
CUEQ_LAYOUT = "ir_mul"


def cueq_available() -> bool:
    """Whether ``cuequivariance`` and ``cuequivariance_torch`` import (as mace found when it was
    imported): :func:`to_cueq` and :func:`to_e3nn` work, on any device."""
    return bool(wrapper_ops.CUET_AVAILABLE)


@functools.cache
def cueq_kernels_available() -> bool:
    """Whether NVIDIA's compiled kernels (``cuequivariance_ops_torch``, from the CUDA-specific
    ``cuequivariance-ops-torch-cu12``/``-cu13`` wheels) import as well; without them cuequivariance
    falls back to plain torch."""
    if not cueq_available():
        return False
    try:
        importlib.import_module("cuequivariance_ops_torch")
    except (ImportError, OSError, RuntimeError):  # absent, or present without a CUDA driver to load
        return False
    return True


def is_cueq(backbone: torch.nn.Module) -> bool:
    """Whether ``backbone`` (or the one a :class:`MixedPrecisionBackbone` wraps) has cuEquivariance layers."""
    return any(type(m).__module__.startswith("cuequivariance_torch") for m in backbone.modules())


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """MACE's layers take their dtype from torch's default when built: set it, then put it back."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _copy_trainable(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """``requires_grad`` of each of ``target``'s parameters from ``source``'s of the same name; a tensor
    that the conversion merged or split (the symmetric contractions' weights) is trainable when any
    of ``source``'s parameters under its nearest common module is."""
    flags = {name: p.requires_grad for name, p in source.named_parameters()}
    for name, p in target.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
            continue
        prefix = name
        while "." in prefix:
            prefix = prefix.rsplit(".", 1)[0]
            under = [flag for other, flag in flags.items() if other.startswith(prefix + ".")]
            if under:
                p.requires_grad_(any(under))
                break


def _convert(backbone: ScaleShiftMACE, cueq_config, transfer_weights) -> ScaleShiftMACE:
    """A new ScaleShiftMACE of ``backbone``'s architecture with ``cueq_config``, weights moved by
    ``transfer_weights`` (mace's e3nn→cueq or cueq→e3nn), on ``backbone``'s device, dtype and mode."""
    parameter = next(backbone.parameters())
    config = extract_config_mace_model(backbone)
    if "error" in config:
        raise ValueError(config["error"])
    config["cueq_config"] = cueq_config
    with _default_dtype(parameter.dtype):
        target = type(backbone)(**config)
    transfer_weights(
        backbone,
        target,
        num_product_irreps=len(config["hidden_irreps"].slices()) - 1,
        correlation=config["correlation"],
        num_layers=config["num_interactions"],
        use_reduced_cg=config["use_reduced_cg"],
        keep_last_layer_irreps=config.get("keep_last_layer_irreps", False),
    )
    _copy_trainable(backbone, target)
    return target.to(parameter.device).train(backbone.training)


def to_cueq(backbone: ScaleShiftMACE, device: torch.device | str | None = None) -> ScaleShiftMACE:
    """A copy of an e3nn ``backbone`` built from cuEquivariance layers: same weights, same outputs.

    On ``device`` (default: the backbone's). On CUDA with the compiled kernels the convolution is
    fused with the scatter over edges (mace's ``conv_fusion``), which only those kernels provide.
    """
    from mace.cli.convert_e3nn_cueq import transfer_weights

    if not cueq_available():
        raise RuntimeError("cuequivariance is not installed: pip install 'ionflow[gpu]'")
    if is_cueq(backbone):
        raise ValueError("the backbone already has cuEquivariance layers")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    config = wrapper_ops.CuEquivarianceConfig(
        enabled=True,
        layout=CUEQ_LAYOUT,
        group="O3_e3nn",
        optimize_all=True,
        conv_fusion=device.type == "cuda" and cueq_kernels_available(),
    )
    return _convert(backbone, config, transfer_weights).to(device)


def to_e3nn(backbone: ScaleShiftMACE) -> ScaleShiftMACE:
    """The e3nn copy of a cuEquivariance ``backbone`` (the layout model files hold), same device;
    an e3nn backbone is returned as it is."""
    from mace.cli.convert_cueq_e3nn import transfer_weights

    if not is_cueq(backbone):
        return backbone
    return _convert(backbone, None, transfer_weights)


class MixedPrecisionBackbone(torch.nn.Module):
    """A ScaleShiftMACE run in a lower ``dtype`` (float32) inside a member of a higher one (float64).

    Positions, cell and shifts arrive in the member's dtype; a strain for the stress is applied to
    them there (so the member's Coulomb term sees strained float64 positions), then the backbone
    sees everything cast to ``dtype``; gradients flow back through the casts. The energy of each
    structure is the float64 sum of its atoms' energies, each atom's E0 from the float64 table:
    the float32 sum of a large structure's E0 (thousands of eV) would lose meV.
    """

    def __init__(self, backbone: ScaleShiftMACE, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.outer_dtype = next(backbone.parameters()).dtype
        self.dtype = dtype
        e0 = torch.atleast_2d(backbone.atomic_energies_fn.atomic_energies.detach())[0].to(torch.float64)
        # what rounding E0 to the inner dtype takes away, per element (eV): added back per atom
        self.register_buffer("e0_rounding", e0 - e0.to(dtype).to(torch.float64), persistent=False)
        self.inner = backbone.to(dtype)

    def __getattr__(self, name: str):
        """The wrapped backbone's modules and attributes (``products``, ``interactions``,
        ``atomic_energies_fn``, ...), so that code that reads ``member.backbone`` sees a backbone."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def forward(
        self,
        data: dict[str, torch.Tensor],
        training: bool = False,
        compute_force: bool = True,
        compute_displacement: bool = False,
        **others: bool,
    ) -> dict[str, torch.Tensor | None]:
        asked = sorted(name for name, value in others.items() if value)
        if asked:  # the member asks for none of these (it derives stress from the displacement)
            raise ValueError(f"MixedPrecisionBackbone computes energy, forces and the displacement, not {asked}")
        positions = data["positions"]
        positions.requires_grad_(True)  # as MACE does: the member differentiates by these
        displacement = None
        if compute_displacement:
            strained, shifts, displacement = get_symmetric_displacement(
                positions=positions,
                unit_shifts=data["unit_shifts"],
                cell=data["cell"],
                edge_index=data["edge_index"],
                num_graphs=int(data["ptr"].numel() - 1),
                batch=data["batch"],
                displacement=data.get("displacement"),
            )
            data["positions"], data["shifts"] = strained, shifts  # as MACE does: the member reads them back
        inner = {k: v.to(self.dtype) if torch.is_floating_point(v) else v for k, v in data.items()}
        out = self.inner(inner, training=training, compute_force=False)
        # node_energy: E0 rounded to dtype + interaction energy, in float64 (MACE's own output)
        node_energy = out["node_energy"].to(torch.float64) + data["node_attrs"].to(torch.float64) @ self.e0_rounding
        n_graphs = int(data["ptr"].numel() - 1)
        energy = torch.zeros(n_graphs, dtype=torch.float64, device=node_energy.device)
        energy = energy.index_add(0, data["batch"], node_energy).to(self.outer_dtype)
        forces = None
        if compute_force:
            grad = torch.autograd.grad(energy.sum(), positions, create_graph=training, allow_unused=True)[0]
            forces = torch.zeros_like(positions) if grad is None else -grad
        return {
            "energy": energy,  # [g] eV
            "interaction_energy": out["interaction_energy"].to(self.outer_dtype),  # [g] eV, summed in dtype
            "node_energy": node_energy.to(self.outer_dtype),  # [n] eV
            "forces": forces,  # [n, 3] eV/Å, when asked for
            "displacement": displacement,
            "node_feats": out["node_feats"].to(self.outer_dtype),
        }


def _plain(backbone: torch.nn.Module) -> torch.nn.Module:
    return backbone.inner if isinstance(backbone, MixedPrecisionBackbone) else backbone


def backbone_dtype(member: Member) -> torch.dtype:
    """The dtype the member's backbone computes in (its heads and Coulomb term: the member's own)."""
    return next(_plain(member.backbone).parameters()).dtype


def set_backbone_dtype(member: Member, dtype: torch.dtype) -> Member:
    """Run ``member``'s backbone in ``dtype`` (float32 in a float64 member: :class:`MixedPrecisionBackbone`),
    or, given the member's own dtype, as built. In place; returns the member. A cuEquivariance
    backbone is rebuilt in the new dtype (its layers fix their dtype when built)."""
    backbone = member.backbone
    outer = backbone.outer_dtype if isinstance(backbone, MixedPrecisionBackbone) else backbone_dtype(member)
    plain = _plain(backbone)
    device = next(plain.parameters()).device
    cueq = is_cueq(plain)
    plain = to_e3nn(plain).to(outer)
    if dtype != outer:
        plain = MixedPrecisionBackbone(plain, dtype)
    if cueq:
        if isinstance(plain, MixedPrecisionBackbone):
            plain.inner = to_cueq(plain.inner, device)
        else:
            plain = to_cueq(plain, device)
    member.backbone = plain
    return member


def accelerate_member(member: Member, device: torch.device | str) -> Member:
    """Put cuEquivariance kernels into ``member``'s backbone, in place, when they help.

    Applies exactly when ``device`` is a CUDA device, :func:`cueq_kernels_available` (cuequivariance,
    cuequivariance_torch and NVIDIA's compiled ops import) and the backbone is still e3nn; then
    ``member.backbone`` (or the one inside a :class:`MixedPrecisionBackbone`) becomes
    :func:`to_cueq` of it on ``device``. Otherwise the member is returned unchanged. Build the
    optimiser after this call: the backbone's parameters are new tensors.
    """
    device = torch.device(device)
    backbone = _plain(member.backbone)
    if device.type != "cuda" or not cueq_kernels_available() or is_cueq(backbone):
        return member
    converted = to_cueq(backbone, device)
    if isinstance(member.backbone, MixedPrecisionBackbone):
        member.backbone.inner = converted
    else:
        member.backbone = converted
    return member


def restore_member(member: Member) -> Member:
    """Undo :func:`accelerate_member` and :func:`set_backbone_dtype`, in place: the e3nn backbone in
    the member's dtype, whose state dict is the layout model files hold."""
    backbone = member.backbone
    plain = to_e3nn(_plain(backbone))
    member.backbone = plain.to(backbone.outer_dtype) if isinstance(backbone, MixedPrecisionBackbone) else plain
    return member


def members(model: torch.nn.Module) -> list[Member]:
    """The :class:`Member` objects in an ensemble (a committee's K, a shallow ensemble's one)."""
    return [module for module in model.modules() if isinstance(module, Member)]


def accelerate(model: torch.nn.Module, device: torch.device | str, mixed_precision: bool = False) -> torch.nn.Module:
    """:func:`accelerate_member` for every member of an ensemble on ``device``, in place: on a CUDA
    device with NVIDIA's kernels, cuEquivariance backbones; elsewhere unchanged. With
    ``mixed_precision`` a float64 member's backbone computes in float32 (:func:`set_backbone_dtype`;
    on any device). :func:`restore` undoes both before a state dict is saved."""
    for member in members(model):
        if mixed_precision and backbone_dtype(member) == torch.float64:
            set_backbone_dtype(member, torch.float32)
        accelerate_member(member, device)
    return model


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """:func:`restore_member` for every member: the e3nn layout model files hold, in place."""
    for member in members(model):
        restore_member(member)
    return model
