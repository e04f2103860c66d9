"""What every step of a campaign shares: its context, its status machine, and its seeds.

Every task takes references (the campaign file's path, the campaign id, the iteration
index) and returns small summaries; structures, trajectories, labels and models travel
through the database and the object store. Every task is idempotent: it reads the
iteration's status from the database, does only what is missing, and commits its writes
in one transaction (labels: one per calculation), so a campaign killed at any point
resumes where it stopped.

Iteration statuses: started -> explored -> selected -> labelled -> trained -> done.
Iteration 0 (bootstrap) goes from started to selected with rattled copies of the starting
structure instead of exploring.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ase import Atoms
from sqlalchemy.orm import Session, sessionmaker

from ionflow.config import CampaignConfig, load_config
from ionflow.db import Model, ObjectStore, make_engine, session_factory, sha256_file, upgrade
from ionflow.dft_adapters import get_adapter
from ionflow.platform.finetune import read_replay
from ionflow.platform.model import Ensemble, load_model
from ionflow.platform.model.foundation import Foundation, read_foundation

ORDER = ("started", "explored", "selected", "labelled", "trained", "done")


def reached(status: str, step: str) -> bool:
    """Whether an iteration in ``status`` has already finished ``step``."""
    return ORDER.index(status) >= ORDER.index(step)


@dataclass(frozen=True)
class Context:
    """What every task needs, built once per process from the campaign file."""

    config: CampaignConfig
    sessions: sessionmaker[Session]
    store: ObjectStore

    @property
    def folder(self) -> Path:
        return self.config.campaign_dir

    @functools.cached_property
    def adapter(self):
        return get_adapter(self.config.reference.adapter, self.config.reference.settings)

    @functools.cached_property
    def foundation(self) -> Foundation | None:
        """The campaign's foundation model (``model.foundation``), read once per process; None without one."""
        model = self.config.model
        if model.foundation is None:
            return None
        return read_foundation(model.foundation, model.foundation_sha256)

    @functools.cached_property
    def replay(self) -> list[Atoms]:
        """The foundation's replay frames (``training.replay_file``); none without a file."""
        path = self.config.training.replay_file
        return [] if path is None else read_replay(path)

    def load(self, model: Model) -> Ensemble:
        """The ensemble a model row points to, refused if its file changed since it was recorded."""
        path = self.store.path(model.checkpoint_path)
        if sha256_file(path) != model.checkpoint_sha256:
            raise RuntimeError(f"model file {path} does not match its recorded sha256; it was changed or damaged")
        return load_model(path)


@functools.cache
def context(config_path: str) -> Context:
    config = load_config(config_path)
    config.campaign_dir.mkdir(parents=True, exist_ok=True)
    upgrade(config.db_url)
    return Context(
        config=config, sessions=session_factory(make_engine(config.db_url)), store=ObjectStore(config.campaign_dir)
    )


# Seeds of a campaign's random streams, derived from its ``seed`` so that no two purposes (and no
# two iterations of one purpose) share a stream. The multipliers are distinct primes and the test
# offset lies beyond any iteration count, so the streams cannot coincide for different seeds either.
# Changing any of them changes every campaign's results: they are part of what a seed means.
_TEST_SET_OFFSET = 10_000  # bootstrap test rattles: seed + this (training rattles use the seed itself)
_WALKER_START_PRIME = 7919  # fresh walker starts of iteration i: seed * this + i
_MD_PRIME = 104729  # Langevin noise of iteration i: seed * this + i
_SELECTION_PRIME = 1299709  # random selection of iteration i: seed * this + i
_HELD_OUT_PRIME = 15485863  # explored frames held out for the test set in iteration i: seed * this + i


def bootstrap_seeds(seed: int) -> tuple[int, int]:
    """Seeds of the bootstrap's (training, test) rattles."""
    return seed, seed + _TEST_SET_OFFSET


def walker_start_seed(seed: int, index: int) -> int:
    """Seed of the fresh (rattled) walker starts of iteration ``index``."""
    return seed * _WALKER_START_PRIME + index


def md_seed(seed: int, index: int) -> int:
    """Seed of the MD walkers' thermostat noise in iteration ``index``."""
    return seed * _MD_PRIME + index


def selection_seed(seed: int, index: int) -> int:
    """Seed of the random selection strategy's draw in iteration ``index``."""
    return seed * _SELECTION_PRIME + index


def held_out_seed(seed: int, index: int) -> int:
    """Seed of the draw of explored frames held out for the test set in iteration ``index``."""
    return seed * _HELD_OUT_PRIME + index


def training_seed(seed: int, index: int) -> int:
    """Seed of the weights and batch order of the model trained in iteration ``index``."""
    return seed + index
