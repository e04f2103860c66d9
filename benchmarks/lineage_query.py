"""Full lineage of a model on a database of 100k structures, on SQLite and PostgreSQL.

The database is shaped like a long campaign: 100 iterations, each with 10 MD runs that sampled
100 candidate frames (100,000 structures and memberships, a selection decision for every
candidate), 10 chosen and labelled per iteration plus 20 bootstrap labels, and a model per
iteration fine-tuned from the previous one (a parent chain 100 long) and trained on every label
so far. ``model_lineage`` of the newest model returns its 99 ancestors, its 1,010 training
members with their calculations and structures, the MD runs they came from and the selection
decisions about them. Rows are bulk-inserted with SQLAlchemy Core; the schema is ionflow's
migration. Median of repeats after one warm-up.

Usage: python benchmarks/lineage_query.py [--postgres URL] [--repeats 20]
       (URL defaults to IONFLOW_TEST_POSTGRES_URL; a fresh schema is made and dropped)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

from ionflow.db import make_engine, model_lineage, session_factory, session_scope, sqlite_url, upgrade, utcnow
from ionflow.db import models as orm
from ionflow.db.provenance import lineage

ITERATIONS, RUNS, FRAMES, CHOSEN, BOOTSTRAP = 100, 10, 100, 10, 20


def populate(url: str) -> int:
    """Fill an empty, migrated database; return the newest model's id."""
    engine = make_engine(url)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(orm.Campaign),
            [
                {
                    "id": 1,
                    "name": "long",
                    "config": {},
                    "config_hash": "c" * 64,
                    "workdir": "/runs/long",
                    "status": "finished",
                    "created_at": now,
                }
            ],
        )
        conn.execute(
            insert(orm.Iteration),
            [
                {"id": i + 1, "campaign_id": 1, "index": i, "status": "done", "created_at": now}
                for i in range(ITERATIONS + 1)
            ],
        )
        structures, members, runs, decisions, calcs, models, training = [], [], [], [], [], [], []
        sid = 0
        labelled: list[int] = []

        def structure(origin: str, iteration: int, run: int | None, step: int | None = None) -> int:
            nonlocal sid
            sid += 1
            structures.append(
                {
                    "id": sid,
                    "hash": f"{sid:064x}",
                    "formula": "H5O2",
                    "n_atoms": 7,
                    "charge": 1,
                    "multiplicity": 1,
                    "path": f"structures/{sid}.extxyz",
                    "created_at": now,
                }
            )
            members.append(
                {
                    "campaign_id": 1,
                    "structure_id": sid,
                    "iteration_id": iteration + 1,
                    "md_run_id": run,
                    "md_step": step,
                    "origin": origin,
                    "created_at": now,
                }
            )
            return sid

        def label(structure_id: int, iteration: int) -> None:
            calcs.append(
                {
                    "id": structure_id,
                    "structure_id": structure_id,
                    "adapter": "pyscf",
                    "code_version": "pyscf 2.14.0",
                    "settings_hash": "s" * 64,
                    "settings": {},
                    "status": "ok",
                    "energy": -4000.0,
                    "results_path": f"arrays/{structure_id}.npz",
                    "results_sha256": "0" * 64,
                    "wall_time_s": 3.0,
                    "iteration_id": iteration + 1,
                    "created_at": now,
                }
            )
            labelled.append(structure_id)

        for _ in range(BOOTSTRAP):
            label(structure("initial", 0, None), 0)
        run_id = 0
        for it in range(1, ITERATIONS + 1):
            for w in range(RUNS):
                run_id += 1
                runs.append(
                    {
                        "id": run_id,
                        "campaign_id": 1,
                        "iteration_id": it + 1,
                        "model_id": it,
                        "start_structure_id": 1,
                        "walker": w,
                        "temperature_K": 350.0,
                        "timestep_fs": 0.5,
                        "n_steps_requested": 1000,
                        "n_steps_done": 1000,
                        "stop_reason": "completed",
                        "wall_time_s": 10.0,
                        "created_at": now,
                    }
                )
                for f in range(FRAMES):
                    s = structure("md", it, run_id, step=10 * (f + 1))
                    chosen = w == 0 and f < CHOSEN
                    decisions.append(
                        {
                            "iteration_id": it + 1,
                            "structure_id": s,
                            "md_run_id": run_id,
                            "score": 0.3,
                            "energy_uncertainty": 0.01,
                            "threshold": 0.1,
                            "chosen": chosen,
                            "reason_code": "uncertain" if chosen else "trusted",
                            "rank": w * FRAMES + f + 1,
                            "reason": "selected" if chosen else "below threshold",
                            "created_at": now,
                        }
                    )
                    if chosen:
                        label(s, it)
        for it in range(ITERATIONS + 1):
            models.append(
                {
                    "id": it + 1,
                    "campaign_id": 1,
                    "iteration_id": it + 1,
                    "version": it,
                    "parent_id": it if it else None,
                    "kind": "mace-committee",
                    "hyperparameters": {},
                    "metrics": {},
                    "checkpoint_path": f"models/model-v{it}.pt",
                    "checkpoint_sha256": "0" * 64,
                    "created_at": now,
                }
            )
            n_labels = BOOTSTRAP + CHOSEN * it
            training.extend({"model_id": it + 1, "calculation_id": c, "split": "train"} for c in labelled[:n_labels])
        # parents before children: one insert per table in dependency order
        conn.execute(insert(orm.Structure), structures)
        for row in models:  # parents first
            conn.execute(insert(orm.Model), [row])
        for model, rows in (
            (orm.MDRun, runs),
            (orm.CampaignStructure, members),
            (orm.SelectionDecision, decisions),
            (orm.Calculation, calcs),
        ):
            for k in range(0, len(rows), 20_000):
                conn.execute(insert(model), rows[k : k + 20_000])
        for k in range(0, len(training), 20_000):
            conn.execute(insert(orm.TrainingMember), training[k : k + 20_000])
        if engine.dialect.name == "postgresql":  # explicit ids: move the sequences past them
            for table in ("campaign", "iteration", "structure", "md_run", "calculation", "model"):
                conn.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
                )
            conn.execute(text("ANALYZE"))
        else:
            conn.execute(text("ANALYZE"))
    engine.dispose()
    return ITERATIONS + 1


def measure(url: str, model_id: int, repeats: int) -> dict[str, tuple[float, dict[str, int]]]:
    """Median seconds of the ORM lineage (``model_lineage``) and of what ``ionflow lineage`` asks
    (``provenance.lineage``: the parent chain, the training members through the view
    ``ionflow_training_set`` with their MD run, step and decision, the counts)."""
    engine = make_engine(url)
    sessions = session_factory(engine)
    out = {}
    for name, ask in (
        ("model_lineage", lambda session: model_lineage(session, model_id)),
        ("ionflow lineage", lambda session: lineage(session, session.get(orm.Model, model_id))),
    ):
        times, sizes = [], {}
        for r in range(repeats + 1):
            with session_scope(sessions) as session:
                start = time.perf_counter()
                found = ask(session)
                elapsed = time.perf_counter() - start
                sizes = {k: len(v) for k, v in found.items() if isinstance(v, list)}
            if r:  # the first is a warm-up
                times.append(elapsed)
        out[name] = (statistics.median(times), sizes)
    engine.dispose()
    return out


def databases(postgres: str | None, prefix: str) -> Iterator[tuple[str, str]]:
    """(name, URL) of an empty, migrated SQLite file and, with ``postgres``, of a fresh schema
    there; each is dropped once the caller moves on to the next."""
    with tempfile.TemporaryDirectory() as tmp:
        url = sqlite_url(Path(tmp) / f"{prefix}.db")
        upgrade(url)
        yield "SQLite (file)", url
    if not postgres:
        return
    schema = f"ionflow_{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(postgres).update_query_dict({"options": f"-csearch_path={schema}"})
        url = url.render_as_string(hide_password=False)
        upgrade(url)
        yield "PostgreSQL (127.0.0.1)", url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("IONFLOW_TEST_POSTGRES_URL"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    results = []
    for name, url in databases(args.postgres, "lineage"):
        t = time.perf_counter()
        model_id = populate(url)
        print(f"{name}: populated in {time.perf_counter() - t:.0f} s", flush=True)
        results.append((name, measure(url, model_id, args.repeats)))

    print(f"\n{date.today()}: lineage of the newest model, 100,000 structures, median of {args.repeats}")
    print("| database | model_lineage (ms) | ionflow lineage (ms) | ancestors | members | md_runs | decisions |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, found in results:
        (orm_s, sizes), (cli_s, cli_sizes) = found["model_lineage"], found["ionflow lineage"]
        print(
            f"| {name} | {1000 * orm_s:.1f} | {1000 * cli_s:.1f} | {sizes['ancestors']} | {cli_sizes['members']} "
            f"| {sizes['md_runs']} | {sizes['decisions']} |"
        )


if __name__ == "__main__":
    main()
