"""Import mace-torch once, quietly, before e3nn.

mace must be imported before e3nn (it sets the torch flag that lets e3nn load its
constants on torch >= 2.6). At import it also prints a notice about the optional
cuequivariance package and triggers TorchScript warnings that say nothing to a user.
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

__all__ = ["ScaleShiftMACE", "interaction_classes"]
