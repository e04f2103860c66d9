"""8 writers at once on one database (PostgreSQL when IONFLOW_TEST_POSTGRES_URL is set, and
SQLite): no row lost, none duplicated, shared structures and calculations made once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select
from writer import OWN, SHARED

from ionflow.db import make_engine, session_factory, session_scope, upgrade
from ionflow.db import models as orm

WRITERS = 8


def test_eight_writers_lose_and_duplicate_nothing(url, tmp_path):  # noqa: F811
    upgrade(url)
    writer = Path(__file__).with_name("writer.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(writer), url, str(tmp_path / "stores"), str(k)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(WRITERS)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for proc in procs:  # all start together
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert out.strip().endswith(f"done {SHARED + OWN}"), out  # every writer sees all its labels

    engine = make_engine(url)
    with session_scope(session_factory(engine)) as session:

        def count(model, *where):
            return session.scalar(select(func.count()).select_from(model).where(*where))

        assert count(orm.Campaign) == WRITERS
        assert count(orm.Structure) == SHARED + WRITERS * OWN  # shared ones once
        assert count(orm.CampaignStructure) == WRITERS * (SHARED + OWN)
        assert count(orm.Calculation) == SHARED + WRITERS * OWN  # one calculation per structure
        assert session.scalar(select(func.count(func.distinct(orm.Calculation.structure_id)))) == SHARED + WRITERS * OWN
        assert count(orm.MDRun) == WRITERS
        assert count(orm.SelectionDecision) == WRITERS * (SHARED + OWN)
        assert count(orm.Model) == WRITERS
        assert count(orm.TrainingMember) == WRITERS * (SHARED + OWN)
        # each shared calculation was recorded by exactly one writer (its host), the others adopted it
        hosts = session.scalars(
            select(orm.Calculation.host)
            .join(orm.Structure)
            .where(
                orm.Structure.id.in_(
                    select(orm.CampaignStructure.structure_id)
                    .group_by(orm.CampaignStructure.structure_id)
                    .having(func.count() == WRITERS)
                )
            )
        ).all()
        assert len(hosts) == SHARED
    engine.dispose()
