"""The evaluate step: the iteration's model on the campaign's test set; it closes the iteration.

The test set is every labelled structure of a test origin (bootstrap rattles, explored frames
held out before selection, an unlabelled test file labelled by the campaign) plus a test file's
own labelled frames. A test set that grows with the campaign makes errors of different
iterations incomparable, so after each iteration every earlier model is evaluated again on the
test set as it now is (``current_test_*`` metrics): the learning curve is always on one set.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ase import Atoms
from prefect import get_run_logger, task
from sqlalchemy.orm import Session

from ionflow.db import session_scope
from ionflow.db.queries import model_of_iteration
from ionflow.db.records import close_iteration, iteration_row, labelled_set
from ionflow.flows.context import Context, context, reached
from ionflow.platform.evaluation import evaluate
from ionflow.platform.structures import write_extxyz

#: Keys of the errors that are kept per iteration on the current test set (the learning curve's).
CURVE_KEYS = ("energy_rmse", "energy_mae", "forces_rmse", "forces_mae")


def test_set(ctx: Context, session: Session, campaign_id: int) -> list[Atoms]:
    """The campaign's labelled test structures, each with ``info["origin"]``."""
    frames = [a for _, a in labelled_set(session, ctx.store, campaign_id, ctx.adapter.settings_hash, test=True)]
    given, labelled = ctx.config.test_structures()
    if labelled:
        for atoms in given:
            atoms.info["origin"] = "test-file"
        frames += given
    return frames


@task(name="evaluate")
def evaluate_task(config_path: str, campaign_id: int, index: int) -> dict[str, Any]:
    """Errors of the iteration's model on the test set (written to ``test.extxyz``), stored on the
    model and the iteration as ``test_*`` metrics, and of every earlier model on the same set
    (``current_test_*``); closes the iteration and returns its metrics."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        if reached(it.status, "done"):
            return dict(it.metrics or {})
        model = model_of_iteration(session, it.id)
        test = test_set(ctx, session, campaign_id)
        write_extxyz(ctx.folder / "test.extxyz", test)
        metrics = dict(it.metrics or {})
        if model is not None and test:
            m = evaluate(ctx.load(model), test)
            model.metrics = dict(model.metrics or {}, test=m)
            metrics.update({f"test_{k}": v for k, v in m.items() if k != "n"}, test_n=m["n"])
            origins = Counter(a.info.get("origin", "test") for a in test)
            metrics.update({f"test_n_{origin}": n for origin, n in sorted(origins.items())})
        it.metrics = metrics
        close_iteration(it)
        if model is not None and test:
            reevaluate(ctx, session, campaign_id, index, test, metrics)
        if "test_forces_rmse" in metrics:
            get_run_logger().info(
                "iteration %d: test energy RMSE %.1f meV/atom, force RMSE %.3f eV/Å on %d structures",
                index,
                1000 * metrics["test_energy_rmse"],
                metrics["test_forces_rmse"],
                metrics["test_n"],
            )
        return dict(it.metrics)


def reevaluate(
    ctx: Context, session: Session, campaign_id: int, index: int, test: list[Atoms], latest: dict[str, Any]
) -> None:
    """Store on every iteration up to ``index`` its model's errors on ``test`` (the test set as it
    is now) as ``current_test_*`` metrics; ``latest`` holds iteration ``index``'s own."""
    for earlier in range(index + 1):
        it = iteration_row(session, campaign_id, earlier)
        model = model_of_iteration(session, it.id)
        if model is None:
            continue
        m = latest if earlier == index else {f"test_{k}": v for k, v in evaluate(ctx.load(model), test).items()}
        current = {f"current_test_{k}": m[f"test_{k}"] for k in CURVE_KEYS}
        it.metrics = dict(it.metrics or {}, **current, current_test_n=len(test))


@task(name="close-iteration")
def close_iteration_task(config_path: str, campaign_id: int, index: int, reason: str) -> None:
    """Mark an iteration done without a new model (nothing was worth labelling), saying why."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        close_iteration(iteration_row(session, campaign_id, index), {"stop_reason": reason})
