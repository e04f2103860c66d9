"""Provenance database: ORM models, sessions, migrations, queries and the object store.

Typical use::

    from ionflow.db import ObjectStore, make_engine, session_factory, session_scope, sqlite_url, upgrade

    url = sqlite_url(workdir / "ionflow.db")
    upgrade(url)                      # create or migrate the schema
    sessions = session_factory(make_engine(url))
    with session_scope(sessions) as session:
        ...
"""

from __future__ import annotations

from ionflow.db.models import (
    CALCULATION_STATUSES,
    CAMPAIGN_STATUSES,
    TRAINING_SPLITS,
    Base,
    Calculation,
    Campaign,
    CampaignStructure,
    Iteration,
    MDRun,
    Model,
    SelectionDecision,
    Structure,
    TrainingMember,
    utcnow,
)
from ionflow.db.objects import ObjectStore, sha256_file
from ionflow.db.queries import (
    calculation_outcomes,
    campaign_by_name,
    find_calculation,
    iteration_table,
    model_lineage,
)
from ionflow.db.session import (
    current_revision,
    make_engine,
    session_factory,
    session_scope,
    sqlite_url,
    upgrade,
)

__all__ = [
    "CALCULATION_STATUSES",
    "CAMPAIGN_STATUSES",
    "TRAINING_SPLITS",
    "Base",
    "Calculation",
    "Campaign",
    "CampaignStructure",
    "Iteration",
    "MDRun",
    "Model",
    "ObjectStore",
    "SelectionDecision",
    "Structure",
    "TrainingMember",
    "calculation_outcomes",
    "campaign_by_name",
    "current_revision",
    "find_calculation",
    "iteration_table",
    "make_engine",
    "model_lineage",
    "session_factory",
    "session_scope",
    "sha256_file",
    "sqlite_url",
    "upgrade",
    "utcnow",
]
