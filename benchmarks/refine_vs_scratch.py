"""Is refining the previous model version as good as training afresh? On a finished campaign.

For every model version of a finished campaign, the same labels it was fitted on (its training
and validation members, read from the campaign's database) train a fresh ensemble from scratch
(``training.epochs``, the campaign's model and training settings, the version's own training
seed); both are evaluated on the campaign's current test set (``test.extxyz`` in its folder,
e.g. held-out MD frames). The campaign's versions after v0 were refined from their parent
(``training.finetune_epochs`` at ``learning_rate x finetune_lr_factor``) unless it ran with
``training.from_scratch``; the comparison is only meaningful for a refined campaign.

Usage: python benchmarks/refine_vs_scratch.py CAMPAIGN.yaml [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch
from sqlalchemy import select

from ionflow.config import load_config
from ionflow.db import (
    Calculation,
    Model,
    ObjectStore,
    Structure,
    TrainingMember,
    make_engine,
    session_factory,
    session_scope,
)
from ionflow.db.records import labelled_atoms
from ionflow.flows.context import training_seed
from ionflow.platform.evaluation import evaluate
from ionflow.platform.model import load_model
from ionflow.platform.structures import read_structures, with_reference_labels
from ionflow.platform.training import train_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("campaign")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = load_config(args.campaign)
    store = ObjectStore(cfg.campaign_dir)
    test = [with_reference_labels(a) for a in read_structures(cfg.campaign_dir / "test.extxyz")]
    sessions = session_factory(make_engine(cfg.db_url))
    rows = []
    with session_scope(sessions) as session:
        for model in session.scalars(select(Model).order_by(Model.version)).all():
            members = session.execute(
                select(TrainingMember.split, Calculation, Structure)
                .join(Calculation, TrainingMember.calculation_id == Calculation.id)
                .join(Structure, Calculation.structure_id == Structure.id)
                .where(TrainingMember.model_id == model.id)
            ).all()
            train = [labelled_atoms(store, st, c) for split, c, st in members if split == "train"]
            valid = [labelled_atoms(store, st, c) for split, c, st in members if split == "valid"]
            campaign = evaluate(load_model(store.path(model.checkpoint_path)), test)
            row = {
                "version": model.version,
                "labels": len(train) + len(valid),
                "from_parent": bool(model.metrics["train_from_parent"]),
                "campaign": (1000 * campaign["energy_rmse"], campaign["forces_rmse"]),
            }
            if model.metrics["train_from_parent"]:
                fresh, _ = train_ensemble(
                    train,
                    valid,
                    cfg.model.settings(),
                    cfg.training.settings(),
                    seed=training_seed(cfg.seed, model.version),
                )
                scratch = evaluate(fresh, test)
                row["scratch"] = (1000 * scratch["energy_rmse"], scratch["forces_rmse"])
            rows.append(row)
            print(row, flush=True)
    print(
        f"\nMachine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads. {date.today()}"
    )
    print(f"Campaign {cfg.name}; test set: {len(test)} structures ({cfg.campaign_dir / 'test.extxyz'})\n")
    print("| version | labels | campaign's model E (meV/atom) | F (eV/Å) | retrained from scratch E | F | ratio F |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        e, f = r["campaign"]
        if "scratch" in r:
            se, sf = r["scratch"]
            print(f"| v{r['version']} | {r['labels']} | {e:.1f} | {f:.3f} | {se:.1f} | {sf:.3f} | {f / sf:.2f}x |")
        else:
            print(f"| v{r['version']} | {r['labels']} | {e:.1f} | {f:.3f} | (trained from scratch) | | |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
