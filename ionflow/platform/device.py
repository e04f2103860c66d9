"""Where training and MD run: a GPU when the machine has one, else the CPU; ``IONFLOW_DEVICE`` decides."""

from __future__ import annotations

import os

import torch

#: Environment variable naming the torch device (``cpu``, ``cuda``, ``cuda:1``) to run on.
DEVICE_VARIABLE = "IONFLOW_DEVICE"


def pick_device() -> torch.device:
    """``IONFLOW_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``) when set, else the first CUDA GPU when
    this machine has one, else the CPU: training and MD use a GPU worker's GPU unasked."""
    name = os.environ.get(DEVICE_VARIABLE)
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{DEVICE_VARIABLE}={name} but torch sees no CUDA device")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
