"""The evaluate step: the iteration's model on the campaign's test set; it closes the iteration."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from ionflow.db import session_scope
from ionflow.db.queries import model_of_iteration
from ionflow.db.records import close_iteration, iteration_row, labelled_set
from ionflow.flows.context import context, reached
from ionflow.platform.evaluation import evaluate
from ionflow.platform.structures import write_extxyz


@task(name="evaluate")
def evaluate_task(config_path: str, campaign_id: int, index: int) -> dict[str, Any]:
    """Errors of the iteration's model on the test set (written to ``test.extxyz``), stored on the
    model and the iteration as ``test_*`` metrics; closes the iteration and returns its metrics."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        if reached(it.status, "done"):
            return dict(it.metrics or {})
        model = model_of_iteration(session, it.id)
        test = [a for _, a in labelled_set(session, ctx.store, campaign_id, ctx.adapter.settings_hash, test=True)]
        write_extxyz(ctx.folder / "test.extxyz", test)
        metrics = dict(it.metrics or {})
        if model is not None and test:
            m = evaluate(ctx.load(model), test)
            model.metrics = dict(model.metrics or {}, test=m)
            metrics.update({f"test_{k}": v for k, v in m.items() if k != "n"}, test_n=m["n"])
        it.metrics = metrics
        close_iteration(it)
        if "test_forces_rmse" in metrics:
            get_run_logger().info(
                "iteration %d: test energy RMSE %.1f meV/atom, force RMSE %.3f eV/Å on %d structures",
                index,
                1000 * metrics["test_energy_rmse"],
                metrics["test_forces_rmse"],
                metrics["test_n"],
            )
        return metrics


@task(name="close-iteration")
def close_iteration_task(config_path: str, campaign_id: int, index: int, reason: str) -> None:
    """Mark an iteration done without a new model (nothing was worth labelling), saying why."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        close_iteration(iteration_row(session, campaign_id, index), {"stop_reason": reason})
