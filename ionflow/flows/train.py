"""The train step: a new model version fitted on every label so far, refined from the previous one
(or, with ``training.from_scratch``, trained afresh; ``parent_id`` records the previous version
either way, and the hyper-parameters say which)."""

from __future__ import annotations

from prefect import get_run_logger, task

from ionflow.db import metrics, session_scope, sha256_file, utcnow
from ionflow.db.provenance import training_set_hash
from ionflow.db.queries import model_of_iteration, newest_model
from ionflow.db.records import iteration_row, labelled_set, record_model
from ionflow.flows.context import context, reached, training_seed
from ionflow.flows.history import run_name, tracked
from ionflow.flows.report import stage
from ionflow.platform.dataset import validation_flags
from ionflow.platform.evaluation import evaluate
from ionflow.platform.model import save_model
from ionflow.platform.structures import write_extxyz
from ionflow.platform.training import train_in_processes, training_processes


@task(name="train", task_run_name=run_name("train"))
@tracked
def train_task(config_path: str, campaign_id: int, index: int) -> int:
    """Fit model version ``index`` on the campaign's labels (test set excluded; the validation
    side of each label fixed by its structure's hash), record it with its training set, and
    write the labels to ``dataset.extxyz``; return the model's id."""
    ctx = context(config_path)
    cfg = ctx.config
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        existing = model_of_iteration(session, it.id)
        if existing is not None:
            it.status = "trained" if not reached(it.status, "trained") else it.status
            return existing.id
        pool = labelled_set(session, ctx.store, campaign_id, ctx.adapter.settings_hash, test=False)
        if not pool:
            raise RuntimeError("no usable labels to train on: every reference calculation failed")
        flags = validation_flags([atoms.info["structure_hash"] for _, atoms in pool], cfg.training.valid_fraction)
        train = [a for (_, a), held_out in zip(pool, flags) if not held_out]
        valid = [a for (_, a), held_out in zip(pool, flags) if held_out]
        parent = newest_model(session, campaign_id, before_index=index)  # the version this one follows
        refine = parent is not None and not cfg.training.from_scratch
        training = cfg.training.settings()
        epochs = training.finetune_epochs if refine else training.epochs
        kind = "heads" if cfg.model.uncertainty == "shallow" else "members"
        with stage(f"train: {cfg.model.ensemble_size} {kind}, {len(train)}+{len(valid)} labels", epochs) as update:
            ensemble, report = train_in_processes(
                training_processes(cfg.execution.train_processes),
                train,
                valid,
                cfg.model.settings(),
                training,
                seed=training_seed(cfg.seed, index),
                parent=ctx.load(parent) if refine else None,
                progress=update,
                foundation=ctx.foundation,  # used only when there is no parent to refine
                replay=ctx.replay,
            )
        splits = {calc.id: "valid" if held_out else "train" for (calc, _), held_out in zip(pool, flags)}
        provenance = {
            "campaign": cfg.name,
            "campaign_config_sha256": cfg.science_hash(),
            "version": index,
            "parent_version": parent.version if parent is not None else None,
            "parent_sha256": parent.checkpoint_sha256 if parent is not None else None,
            "refined_from_parent": refine,
            "training_set_sha256": training_set_hash(
                (a.info["structure_hash"], calc.settings_hash, splits[calc.id]) for calc, a in pool
            ),
            "n_train": len(train),
            "n_valid": len(valid),
            "reference": f"{ctx.adapter.name} {ctx.adapter.settings_hash}",
            "created_at": utcnow().isoformat(),
        }
        path = save_model(ensemble, ctx.folder / "models" / f"model-v{index}.pt", provenance)
        model = record_model(
            session,
            splits,
            campaign_id=campaign_id,
            iteration_id=it.id,
            version=index,
            parent_id=parent.id if parent is not None else None,
            kind=f"mace-{cfg.model.uncertainty}",
            hyperparameters={
                "model": cfg.model.model_dump(mode="json"),
                "training": cfg.training.model_dump(mode="json"),
                "spec": ensemble.spec.to_dict(),
            },
            metrics={**metrics.training(report.__dict__), **metrics.errors("valid", evaluate(ensemble, valid))},
            checkpoint_path=str(path.relative_to(ctx.folder)),
            checkpoint_sha256=sha256_file(path),
        )
        write_extxyz(ctx.folder / "dataset.extxyz", [a for _, a in pool])
        it.status = "trained"
        get_run_logger().info(
            "model v%d trained on %d+%d labels in %.0f s (%d epochs%s)",
            index,
            len(train),
            len(valid),
            report.wall_time_s,
            epochs,
            (f", refined from v{parent.version}" if refine else ", from scratch") if parent else "",
        )
        return model.id
