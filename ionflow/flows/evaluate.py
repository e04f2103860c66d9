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

from ionflow.db import metrics, session_scope
from ionflow.db.queries import model_of_iteration
from ionflow.db.records import close_iteration, iteration_row, labelled_set
from ionflow.flows.context import Context, context, reached
from ionflow.flows.history import run_name, tracked
from ionflow.platform.evaluation import evaluate
from ionflow.platform.structures import write_extxyz


def test_set(ctx: Context, session: Session, campaign_id: int) -> list[Atoms]:
    """The campaign's labelled test structures, each with ``info["origin"]``."""
    frames = [a for _, a in labelled_set(session, ctx.store, campaign_id, ctx.adapter.settings_hash, test=True)]
    given, labelled = ctx.config.test_structures()
    if labelled:
        for atoms in given:
            atoms.info["origin"] = "test-file"
        frames += given
    return frames


@task(name="evaluate", task_run_name=run_name("evaluate"))
@tracked
def evaluate_task(config_path: str, campaign_id: int, index: int) -> dict[str, Any]:
    """Errors of the iteration's model on the test set (written to ``test.extxyz``), stored on the
    model as ``test_*`` metrics, and of every model so far on the same set (``current_test_*``);
    the test set's composition goes on the iteration, which this closes. Returns the model's errors."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        model = model_of_iteration(session, it.id)
        if reached(it.status, "done"):
            return dict(model.metrics or {}) if model is not None else {}
        test = test_set(ctx, session, campaign_id)
        write_extxyz(ctx.folder / "test.extxyz", test)
        composition = {"test_set_n_structures": len(test)}
        origins = Counter(a.info.get("origin", "test") for a in test)
        composition.update({f"test_set_n_{origin}": n for origin, n in sorted(origins.items())})
        close_iteration(it, composition)
        if model is not None and test:
            m = evaluate(ctx.load(model), test)
            model.metrics = dict(model.metrics or {}, **metrics.errors("test", m))
            reevaluate(ctx, session, campaign_id, index, test, m)
            get_run_logger().info(
                "iteration %d: test energy RMSE %.1f meV/atom, force RMSE %.3f eV/Å on %d structures",
                index,
                1000 * m["energy_rmse"],
                m["forces_rmse"],
                m["n"],
            )
        return dict(model.metrics or {}) if model is not None else {}


def reevaluate(
    ctx: Context, session: Session, campaign_id: int, index: int, test: list[Atoms], latest: dict[str, Any]
) -> None:
    """Store on the model of every iteration up to ``index`` its errors on ``test`` (the test set
    as it is now) as ``current_test_*`` metrics; ``latest`` holds iteration ``index``'s model's."""
    for earlier in range(index + 1):
        model = model_of_iteration(session, iteration_row(session, campaign_id, earlier).id)
        if model is None:
            continue
        m = latest if earlier == index else evaluate(ctx.load(model), test)
        model.metrics = dict(model.metrics or {}, **metrics.errors("current_test", m))


@task(name="close-iteration", task_run_name=run_name("close-iteration"))
@tracked
def close_iteration_task(config_path: str, campaign_id: int, index: int, reason: str) -> None:
    """Mark an iteration done without a new model (nothing was worth labelling), saying why."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        it.stop_reason = reason
        close_iteration(it)
