"""Where training and MD run: a GPU when the machine has one, else the CPU; IONFLOW_DEVICE decides."""

from __future__ import annotations

import pytest
import torch

from ionflow.platform.device import pick_device


def test_default_is_a_gpu_when_there_is_one(monkeypatch):
    monkeypatch.delenv("IONFLOW_DEVICE", raising=False)
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_environment_chooses_and_a_missing_gpu_is_an_error(monkeypatch):
    monkeypatch.setenv("IONFLOW_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("IONFLOW_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            pick_device()
