"""The campaign flow: explore -> select -> label -> train -> evaluate, repeated; iteration 0 is
the loop's first pass with bootstrap (rattled copies of the start) in place of explore and select.

The database decides what is done (see :mod:`ionflow.flows.context`): running the flow again on
the same campaign file resumes it. Each step is a module of this package.
"""

from __future__ import annotations

import fcntl
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, runtime, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from ionflow.db import calculation_outcomes, iteration_table, metrics, session_scope
from ionflow.db.queries import newest_model, usable_label_count
from ionflow.db.records import iteration_row, open_campaign, set_campaign_status
from ionflow.flows import history, report
from ionflow.flows.bootstrap import bootstrap_task
from ionflow.flows.context import context, reached
from ionflow.flows.evaluate import close_iteration_task, evaluate_task
from ionflow.flows.explore import explore_task, fit_for_md
from ionflow.flows.label import label_step, too_many_failures
from ionflow.flows.selection import select_task, why_nothing_chosen
from ionflow.flows.train import train_task

log = logging.getLogger("ionflow")

#: The learning curve's picture, in the campaign folder (rewritten after every iteration).
LEARNING_CURVE = "learning_curve.png"
#: Predicted against real error of every model, in the campaign folder (rewritten likewise).
CALIBRATION = "calibration.png"
#: Where ``ionflow ui`` serves the dashboard, for the Prefect link artifact (``IONFLOW_UI_URL``).
DASHBOARD_URL = "http://127.0.0.1:8765"


def dashboard_url(campaign_id: int) -> str:
    """The campaign's dashboard page (``$IONFLOW_UI_URL``, default ``ionflow ui``'s address)."""
    import os

    return f"{os.environ.get('IONFLOW_UI_URL', DASHBOARD_URL).rstrip('/')}/campaign/{campaign_id}"


def iteration_report(folder: Path, name: str, campaign_id: int, index: int, row: dict[str, Any]) -> str:
    """Markdown for the Prefect UI: the iteration's numbers, the learning curve and the calibration
    as images (embedded, so the artifact does not depend on the campaign folder being reachable)."""
    import base64

    e, f = report.test_errors(row)
    lines = [
        f"## {name}: iteration {index}",
        "",
        f"- labels so far: {row['n_labels']}, trained on: {row['n_training_labels'] or '-'}",
        f"- frames selected: {row['n_selected']}, failed calculations: {row['n_failed']}",
        f"- reference CPU so far: {row['reference_cpu_s']:.0f} s",
        f"- test errors of model v{row['model_version']}: "
        + (f"{1000 * e:.2f} meV/atom, {f:.4f} eV/Å" if f is not None else "not tested"),
        f"- dashboard: [{dashboard_url(campaign_id)}]({dashboard_url(campaign_id)})",
        "",
    ]
    for picture, caption in ((LEARNING_CURVE, "learning curve"), (CALIBRATION, "uncertainty calibration")):
        path = folder / picture
        if path.is_file():
            encoded = base64.b64encode(path.read_bytes()).decode()
            lines += [f"![{caption}](data:image/png;base64,{encoded})", ""]
    return "\n".join(lines)


@flow(name="ionflow-campaign", log_prints=True)
def campaign_flow(config_path: str, gpu_deployment: str | None = None) -> dict[str, Any]:
    """Run (or resume) the campaign described by the file at ``config_path``; with
    ``gpu_deployment`` (``ionflow-gpu-step/NAME``), its MD and training steps run as flow runs
    of that deployment, on its (GPU) work pool."""
    config_path = str(Path(config_path).resolve())
    cfg = context(config_path).config
    lock = _lock(cfg.campaign_dir)
    try:
        campaign_id = open_campaign_task(config_path, str(runtime.flow_run.id or ""))
        flow_run = history.flow_started(config_path, campaign_id)
        try:
            report.console.print(f"[bold]ionflow[/] campaign [cyan]{cfg.name}[/] in {cfg.campaign_dir}")
            stop_reason, status = f"finished {cfg.iterations} iterations", "finished"
            for index in range(cfg.iterations + 1):
                if index == 0:
                    bootstrap_task(config_path, campaign_id)
                else:
                    if cfg.max_labels is not None and _labels_so_far(config_path, campaign_id) >= cfg.max_labels:
                        stop_reason = f"label budget of {cfg.max_labels} reached"
                        break
                    _gpu_step(gpu_deployment, config_path, campaign_id, index, "explore")
                    done = fit_for_md(config_path, campaign_id, index)
                    if done is None and select_task(config_path, campaign_id, index) == 0:
                        done = why_nothing_chosen(config_path, campaign_id, index)
                    if done is not None:
                        stop_reason = done
                        close_iteration_task(config_path, campaign_id, index, stop_reason)
                        _show_iteration(config_path, campaign_id, index)
                        break
                label_step(config_path, campaign_id, index)
                if (failing := too_many_failures(config_path, campaign_id)) is not None:
                    stop_reason, status = failing, "stopped"
                    break
                _gpu_step(gpu_deployment, config_path, campaign_id, index, "train")
                evaluate_task(config_path, campaign_id, index)
                _show_iteration(config_path, campaign_id, index)
            summary = finish(config_path, campaign_id, stop_reason, status=status)
            history.flow_ended(config_path, flow_run, "COMPLETED")
            return summary
        except BaseException as exc:
            history.flow_ended(config_path, flow_run, "CANCELLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
    finally:
        lock.close()


#: Seconds between the campaign flow's looks at a GPU step's flow run: steps take minutes, and a
#: look is one request to the Prefect server.
GPU_STEP_POLL_S = 2

#: The steps that belong on GPU workers.
GPU_STEPS = {"explore": explore_task, "train": train_task}


@flow(name="ionflow-gpu-step", log_prints=True)
def gpu_step_flow(config_path: str, campaign_id: int, index: int, step: str) -> None:
    """One MD exploration (``step="explore"``) or training (``"train"``) step of a campaign, as
    its own flow run: deployed on a gpu work pool, the campaign flow runs these there."""
    if step not in GPU_STEPS:
        raise ValueError(f"unknown step {step!r}; one of {', '.join(GPU_STEPS)}")
    flow_run = history.flow_started(config_path, campaign_id)
    try:
        GPU_STEPS[step](config_path, campaign_id, index)
    except BaseException:
        history.flow_ended(config_path, flow_run, "FAILED")
        raise
    history.flow_ended(config_path, flow_run, "COMPLETED")


def _gpu_step(gpu_deployment: str | None, config_path: str, campaign_id: int, index: int, step: str) -> None:
    """Run ``step`` here, or, with ``gpu_deployment``, as a flow run of that deployment (on its
    work pool), waiting for it; its outcome is in the database either way."""
    if gpu_deployment is None:
        GPU_STEPS[step](config_path, campaign_id, index)
        return
    if _step_done(config_path, campaign_id, index, step):
        return  # resuming: a flow run would start a worker process (~20 s) only to find it done
    from prefect.deployments import run_deployment

    run = run_deployment(
        gpu_deployment,
        parameters={"config_path": config_path, "campaign_id": campaign_id, "index": index, "step": step},
        timeout=None,
        poll_interval=GPU_STEP_POLL_S,
        tags=["ionflow", step],
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state is not None else "unknown"
        raise RuntimeError(
            f"{step} of iteration {index} ended {state} on deployment {gpu_deployment} (flow run {run.id})"
        )


#: The iteration status that says a GPU step is done.
GPU_STEP_DONE = {"explore": "explored", "train": "trained"}


def _step_done(config_path: str, campaign_id: int, index: int, step: str) -> bool:
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        return reached(iteration_row(session, campaign_id, index).status, GPU_STEP_DONE[step])


@task(name="open-campaign")
def open_campaign_task(config_path: str, flow_run_id: str | None = None) -> int:
    """Create (or reopen for resuming) the campaign folder, database and row; return its id."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        campaign = open_campaign(
            session,
            ctx.config.name,
            ctx.config.model_dump(mode="json"),
            ctx.config.science_hash(),
            str(ctx.folder),
        )
        campaign.prefect_flow_run_id = flow_run_id
        session.flush()
        return campaign.id


def _labels_so_far(config_path: str, campaign_id: int) -> int:
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        return usable_label_count(session, campaign_id)


def _show_iteration(config_path: str, campaign_id: int, index: int) -> list[dict[str, Any]]:
    """Print the iteration table, draw the learning curve and the calibration (``learning_curve.png``,
    ``calibration.png``), and publish them to Prefect: the iteration's row and the learning curve as
    tables, a markdown report with both pictures, and a link to the campaign's dashboard page."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        rows = iteration_table(session, campaign_id)
    name = ctx.config.name
    report.console.print(report.iteration_table(rows, f"{name}: after iteration {index}"))
    n_test = metrics.test_set_size(rows[index]["model_metrics"])
    where = f"the test set as it is after iteration {index} ({n_test} structures)" if n_test else "the test set"
    report.learning_curve(rows, ctx.folder / LEARNING_CURVE, f"{name}: every model's errors on {where}")
    report.calibration_plot(rows, ctx.folder / CALIBRATION, f"{name}: uncertainty calibration on {where}")
    row = rows[index]
    keys = ("n_labels", "n_training_labels", "reference_cpu_s", "n_selected", "model_version")
    quantities = {**{k: row[k] for k in keys}, **row["metrics"], **row["model_metrics"]}
    slug = name.lower().replace("_", "-").replace(".", "-")
    create_table_artifact(
        key=f"{slug}-iteration-{index}",
        table=[{"quantity": k, "value": v} for k, v in quantities.items()],
        description=f"ionflow campaign {name}, iteration {index}",
    )
    create_markdown_artifact(
        key=f"{slug}-iteration-{index}-report",
        markdown=iteration_report(ctx.folder, name, campaign_id, index, rows[index]),
        description=f"ionflow campaign {name}, iteration {index}: learning curve and calibration",
    )
    create_link_artifact(
        key=f"{slug}-dashboard",
        link=dashboard_url(campaign_id),
        link_text=f"{name} on the ionflow dashboard (ionflow ui {ctx.folder})",
        description="the campaign's page on the ionflow dashboard",
    )
    create_table_artifact(
        key=f"{slug}-learning-curve",
        table=[
            {
                "iteration": r["index"],
                "labels trained on": r["n_training_labels"],
                "reference CPU s": round(r["reference_cpu_s"], 1),
                "test energy RMSE meV/atom": _milli(report.test_errors(r)[0]),
                "test force RMSE eV/Å": report.test_errors(r)[1],
                "test structures": metrics.test_set_size(r["model_metrics"]),
            }
            for r in rows
            if r["model_version"] is not None
        ],
        description=f"ionflow campaign {name}: test errors against labels and reference CPU time",
    )
    return rows


def _milli(value: float | None) -> float | None:
    return None if value is None else 1000 * value


def _lock(folder: Path):
    """Hold an exclusive lock on the campaign folder (released by the OS if the process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "w")  # noqa: SIM115 (held open for the whole run: the lock lives as long as it)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(f"campaign folder {folder} is in use by another ionflow process") from None
    return handle


@dataclass
class CampaignSummary:
    """Where a campaign's outputs are, and why it stopped."""

    name: str
    folder: str
    database_url: str
    model: str | None
    dataset: str
    test_set: str
    learning_curve: str
    stop_reason: str
    status: str = "finished"
    iterations: list[dict[str, Any]] = field(default_factory=list)
    calculations: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)


def finish(config_path: str, campaign_id: int, stop_reason: str, status: str = "finished") -> dict[str, Any]:
    """Mark the campaign ``finished`` (or ``stopped``, when it cannot go on as configured) and
    say where its outputs are, with how its reference calculations ended."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        campaign = set_campaign_status(session, campaign_id, status)
        counts, failures = calculation_outcomes(session, campaign_id, ctx.adapter.settings_hash)
        latest = newest_model(session, campaign_id)
        summary = CampaignSummary(
            name=campaign.name,
            folder=str(ctx.folder),
            database_url=ctx.config.db_url,
            model=str(ctx.store.path(latest.checkpoint_path)) if latest else None,
            dataset=str(ctx.folder / "dataset.extxyz"),
            test_set=str(ctx.folder / "test.extxyz"),
            learning_curve=str(ctx.folder / LEARNING_CURVE),
            stop_reason=stop_reason,
            status=status,
            iterations=iteration_table(session, campaign_id),
            calculations=counts,
            failures=failures,
        )
    log.info("campaign %s stopped: %s", summary.name, stop_reason)
    return summary.__dict__
