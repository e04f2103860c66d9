"""Fixtures for flow tests: an isolated Prefect home and a tiny campaign file."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import yaml

# Before anything imports prefect: a private Prefect home, no network.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ionflow-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from tests.flows.aiida_setup import aiida_localhost, aiida_slurm  # noqa: E402, F401  (fixtures: AiiDA profile, computers)
from tests.structures import ZUNDEL  # noqa: E402  (after the Prefect settings)


def tiny_campaign(tmp_path: Path, **changes) -> dict:
    """A campaign that finishes in seconds: Zundel cation, tblite, a 2-member 1-layer committee."""
    config = {
        "name": "tiny",
        "workdir": str(tmp_path / "runs"),
        "iterations": 2,
        "seed": 3,
        "system": {"charge": 1, "multiplicity": 1, "structure": copy.deepcopy(ZUNDEL)},  # a test may change it
        "reference": {"adapter": "tblite"},
        "model": {"ensemble_size": 2, "hidden_irreps": "8x0e+8x1o", "mlp_irreps": "8x0e", "num_interactions": 1},
        "training": {"epochs": 10, "finetune_epochs": 5},  # the flow is under test, not the fit
        "bootstrap": {"n_train": 6, "n_test": 3},
        # the spreads are calibrated to predicted errors, and 10 epochs leave errors of eV/Å:
        # a wide trust window keeps every iteration labelling
        "explore": {"walkers": 2, "steps": 30, "sample_every": 5, "stop_uncertainty": 100.0},
        "selection": {"per_iteration": 3, "threshold": 0.001, "ceiling": 100.0},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def write_campaign(tmp_path: Path, config: dict, name: str = "campaign.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (with its own database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


#: The finished campaign of the provenance and dashboard tests: three iterations, one held-out
#: MD frame per iteration.
PROVENANCE = {"iterations": 2, "test": {"held_out_per_iteration": 1}}


@pytest.fixture(scope="session")
def finished_campaign(tmp_path_factory, prefect_server):
    """A finished campaign on SQLite (see :data:`PROVENANCE`), shared by the tests that only read
    it: ``{"path", "ctx", "summary", "backend", "tmp"}``."""
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context

    tmp = tmp_path_factory.mktemp("provenance-sqlite")
    path = write_campaign(tmp, tiny_campaign(tmp, **PROVENANCE))
    summary = campaign_flow(str(path))
    return {"path": path, "ctx": context(str(path.resolve())), "summary": summary, "backend": "sqlite", "tmp": tmp}
