"""MACE's building blocks and e3nn's irreps, imported once, quietly, in the right order.

mace must be imported before e3nn (it sets the torch flag that lets e3nn load its
constants on torch >= 2.6): import ``o3`` from here, never from e3nn directly. At import
mace also prints a notice about the optional cuequivariance package and triggers
TorchScript warnings that say nothing to a user.
"""

from __future__ import annotations

import contextlib
import io
import warnings

# Harmless and repeated once per model build; everything else stays visible.
warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support")
warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected")

with contextlib.redirect_stdout(io.StringIO()):
    import mace  # noqa: F401
    from mace.modules import ScaleShiftMACE, interaction_classes

from e3nn import o3  # after mace, see above

__all__ = ["ScaleShiftMACE", "interaction_classes", "o3"]
