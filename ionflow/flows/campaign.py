"""The campaign flow: bootstrap, then explore -> select -> label -> train -> evaluate, repeated.

The database decides what is done (see :mod:`ionflow.flows.tasks`): running the
flow again on the same campaign file resumes it.
"""

from __future__ import annotations

import fcntl
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_table_artifact
from sqlalchemy import func, select

from ionflow.db import (
    Calculation,
    Campaign,
    CampaignStructure,
    Model,
    SelectionDecision,
    calculation_outcomes,
    iteration_table,
    session_scope,
)
from ionflow.db.queries import asked_to_label
from ionflow.db.records import iteration_row
from ionflow.flows import report
from ionflow.flows.tasks import (
    LABEL_TAG,
    bootstrap_task,
    close_iteration_task,
    context,
    evaluate_task,
    explore_task,
    label_chunk_task,
    label_close_task,
    label_plan_task,
    label_task,
    open_campaign_task,
    select_task,
    train_task,
)
from ionflow.platform.selection import Decision, nothing_chosen

log = logging.getLogger("ionflow")


@dataclass
class CampaignSummary:
    """Where a campaign's outputs are, and why it stopped."""

    name: str
    folder: str
    database_url: str
    model: str | None
    dataset: str
    test_set: str
    stop_reason: str
    status: str = "finished"
    iterations: list[dict[str, Any]] = field(default_factory=list)
    calculations: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)


def _nothing_chosen(config_path: str, campaign_id: int, index: int) -> str:
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        rows = session.scalars(select(SelectionDecision).where(SelectionDecision.iteration_id == it.id)).all()
        return nothing_chosen([Decision(r.id, r.score, r.chosen, r.reason) for r in rows])


def _labels_so_far(config_path: str, campaign_id: int) -> int:
    """Usable labels of the campaign (computed by it or, for structures it asked to label, by another campaign)."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        return session.scalar(
            select(func.count(Calculation.id))
            .join(CampaignStructure, CampaignStructure.structure_id == Calculation.structure_id)
            .where(
                CampaignStructure.campaign_id == campaign_id,
                asked_to_label(campaign_id),
                Calculation.status == "ok",
            )
        )


def _too_many_failures(config_path: str, campaign_id: int) -> str | None:
    """The stop reason when more than ``reference.max_failure_ratio`` of the campaign's reference
    calculations did not end ``ok`` (with the failures shown as a table), else None."""
    ctx = context(config_path)
    cap = ctx.config.reference.max_failure_ratio
    with session_scope(ctx.sessions) as session:
        counts, failures = calculation_outcomes(session, campaign_id, ctx.adapter.settings_hash)
    total = sum(counts.values())
    bad = total - counts.get("ok", 0)
    if total == 0 or bad / total <= cap:
        return None
    report.console.print(report.failure_table(counts, failures, f"{ctx.config.name}: reference calculations"))
    return (
        f"{bad} of {total} reference calculations ({100 * bad / total:.0f}%) failed, timed out or did not "
        f"converge, above reference.max_failure_ratio {cap:g}; the table lists them. Fix the cause (settings, "
        f"timeout_s, the code's installation), or raise the cap, and run the campaign again to continue"
    )


def _show_iteration(config_path: str, campaign_id: int, index: int) -> list[dict[str, Any]]:
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        rows = iteration_table(session, campaign_id)
    report.console.print(report.iteration_table(rows, f"{ctx.config.name}: after iteration {index}"))
    row = rows[index]
    metrics = row["metrics"]
    create_table_artifact(
        key=f"{ctx.config.name.lower().replace('_', '-').replace('.', '-')}-iteration-{index}",
        table=[
            {"quantity": k, "value": v}
            for k, v in {**{k: row[k] for k in ("n_labels", "n_selected", "model_version")}, **metrics}.items()
        ],
        description=f"ionflow campaign {ctx.config.name}, iteration {index}",
    )
    return rows


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


#: The steps that belong on GPU workers.
GPU_STEPS = {"explore": explore_task, "train": train_task}


@flow(name="ionflow-gpu-step", log_prints=True)
def gpu_step_flow(config_path: str, campaign_id: int, index: int, step: str) -> None:
    """One MD exploration (``step="explore"``) or training (``"train"``) step of a campaign, as
    its own flow run: deployed on a gpu work pool, the campaign flow runs these there."""
    if step not in GPU_STEPS:
        raise ValueError(f"unknown step {step!r}; one of {', '.join(GPU_STEPS)}")
    GPU_STEPS[step](config_path, campaign_id, index)


def _label(config_path: str, campaign_id: int, index: int) -> None:
    """The label step: on local worker processes, or (``execution.task_runner: dask``) as
    chunks of Prefect tasks on a Dask cluster, each committing its results as they end."""
    cfg = context(config_path).config.execution
    # under a deployment, the label tasks carry the tag that `ionflow deploy --label-concurrency` limits
    tags = [LABEL_TAG] if runtime.deployment.id else []
    if cfg.task_runner == "local":
        label_task.with_options(tags=tags)(config_path, campaign_id, index)
        return
    from prefect_dask import DaskTaskRunner

    iteration_id, pending, reused = label_plan_task(config_path, campaign_id, index)
    if iteration_id is None:
        return
    if cfg.dask_address:
        runner = DaskTaskRunner(address=cfg.dask_address)
    else:  # Dask's nanny gives each worker process OMP_NUM_THREADS=1 (and the BLAS equivalents)
        runner = DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": cfg.dask_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            },
        )
    chunks = [c for c in (pending[k :: cfg.dask_workers] for k in range(cfg.dask_workers)) if c]
    counts: dict[str, int] = {}
    with runner:
        futures = [
            runner.submit(
                label_chunk_task.with_options(tags=tags),
                parameters={
                    "config_path": config_path,
                    "index": index,
                    "iteration_id": iteration_id,
                    "structure_ids": chunk,
                },
            )
            for chunk in chunks
        ]
        for future in futures:
            chunk_counts, raced = future.result()
            reused += raced
            for status, n in chunk_counts.items():
                counts[status] = counts.get(status, 0) + n
    label_close_task(config_path, campaign_id, index, counts, reused)


def _gpu_step(gpu_deployment: str | None, config_path: str, campaign_id: int, index: int, step: str) -> None:
    """Run ``step`` here, or, with ``gpu_deployment``, as a flow run of that deployment (on its
    work pool), waiting for it; its outcome is in the database either way."""
    if gpu_deployment is None:
        GPU_STEPS[step](config_path, campaign_id, index)
        return
    from prefect.deployments import run_deployment

    run = run_deployment(
        gpu_deployment,
        parameters={"config_path": config_path, "campaign_id": campaign_id, "index": index, "step": step},
        timeout=None,
        poll_interval=2,
        tags=["ionflow", step],
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state is not None else "unknown"
        raise RuntimeError(
            f"{step} of iteration {index} ended {state} on deployment {gpu_deployment} (flow run {run.id})"
        )


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
        report.console.print(f"[bold]ionflow[/] campaign [cyan]{cfg.name}[/] in {cfg.campaign_dir}")

        # Iteration 0: first labels and first model.
        bootstrap_task(config_path, campaign_id)
        _label(config_path, campaign_id, 0)
        if (failing := _too_many_failures(config_path, campaign_id)) is not None:
            return finish(config_path, campaign_id, failing, status="stopped")
        _gpu_step(gpu_deployment, config_path, campaign_id, 0, "train")
        evaluate_task(config_path, campaign_id, 0)
        _show_iteration(config_path, campaign_id, 0)

        stop_reason = f"finished {cfg.iterations} iterations"
        for index in range(1, cfg.iterations + 1):
            if cfg.max_labels is not None and _labels_so_far(config_path, campaign_id) >= cfg.max_labels:
                stop_reason = f"label budget of {cfg.max_labels} reached"
                break
            _gpu_step(gpu_deployment, config_path, campaign_id, index, "explore")
            chosen = select_task(config_path, campaign_id, index)
            if chosen == 0:
                stop_reason = _nothing_chosen(config_path, campaign_id, index)
                close_iteration_task(config_path, campaign_id, index, stop_reason)
                _show_iteration(config_path, campaign_id, index)
                break
            _label(config_path, campaign_id, index)
            if (failing := _too_many_failures(config_path, campaign_id)) is not None:
                return finish(config_path, campaign_id, failing, status="stopped")
            _gpu_step(gpu_deployment, config_path, campaign_id, index, "train")
            evaluate_task(config_path, campaign_id, index)
            _show_iteration(config_path, campaign_id, index)
        return finish(config_path, campaign_id, stop_reason)
    finally:
        lock.close()


def finish(config_path: str, campaign_id: int, stop_reason: str, status: str = "finished") -> dict[str, Any]:
    """Mark the campaign ``finished`` (or ``stopped``, when it cannot go on as configured) and
    say where its outputs are, with how its reference calculations ended."""
    ctx = context(config_path)
    with session_scope(ctx.sessions) as session:
        campaign = session.get(Campaign, campaign_id)
        campaign.status = status
        counts, failures = calculation_outcomes(session, campaign_id, ctx.adapter.settings_hash)
        latest = session.scalar(
            select(Model).where(Model.campaign_id == campaign_id).order_by(Model.version.desc()).limit(1)
        )
        rows = iteration_table(session, campaign_id)
        summary = CampaignSummary(
            name=campaign.name,
            folder=str(ctx.folder),
            database_url=ctx.config.db_url,
            model=str(ctx.store.path(latest.checkpoint_path)) if latest else None,
            dataset=str(ctx.folder / "dataset.extxyz"),
            test_set=str(ctx.folder / "test.extxyz"),
            stop_reason=stop_reason,
            status=status,
            iterations=rows,
            calculations=counts,
            failures=failures,
        )
    log.info("campaign %s stopped: %s", summary.name, stop_reason)
    return summary.__dict__
