"""The label step: reference calculations of the chosen structures, on local worker processes or
as chunks of Prefect tasks on a Dask cluster, each result committed to the database as it ends.

A structure that already has a calculation at this level of theory (same settings hash) is never
computed again, whatever its status, even when another campaign sharing the database computed it:
that calculation is adopted (its results copied into this campaign's object store).
"""

from __future__ import annotations

from prefect import get_run_logger, runtime, task

from ionflow.db import Structure, calculation_outcomes, session_scope
from ionflow.db.queries import structures_to_label
from ionflow.db.records import adopt_calculation, calculation_for, iteration_row, record_or_adopt
from ionflow.dft_adapters.pool import label_stream
from ionflow.flows import report
from ionflow.flows.context import Context, context, reached
from ionflow.flows.history import chunk, label_count, run_name, tracked
from ionflow.flows.report import stage

#: Tag of the label step: a Prefect task concurrency limit on it bounds labelling server-wide.
LABEL_TAG = "ionflow-label"


def _pending(ctx: Context, campaign_id: int, index: int) -> tuple[int | None, list[int], int]:
    """(iteration id, structure ids still to compute, labels adopted) of iteration ``index``;
    iteration id None when it is labelled already."""
    with session_scope(ctx.sessions) as session:
        it = iteration_row(session, campaign_id, index)
        if reached(it.status, "labelled"):
            return None, [], 0
        pending, reused = [], 0
        for row in structures_to_label(session, it):
            calculation = calculation_for(session, row.id, ctx.adapter.settings_hash)
            if calculation is None:
                pending.append(row.id)
            else:  # computed before a restart, or by another campaign sharing the database
                adopt_calculation(session, ctx.store, calculation)
                reused += 1
        return it.id, pending, reused


def _compute(
    ctx: Context, structure_ids: list[int], index: int, iteration_id: int, workers: int
) -> tuple[dict[str, int], int]:
    """Label ``structure_ids`` on ``workers`` local workers, committing each result as it ends;
    return (counts per status, results another writer recorded first)."""
    ref = ctx.config.reference
    with session_scope(ctx.sessions) as session:
        rows = [session.get(Structure, i) for i in structure_ids]
        structures = [ctx.store.get_structure(row.path) for row in rows]
        run_dirs = [ctx.folder / "dft" / f"{index:03d}-{row.hash[:16]}" for row in rows]
    counts: dict[str, int] = {}
    reused = 0
    workers = min(workers, max(1, len(structure_ids)))
    name = ctx.adapter.name
    with stage(f"label: {len(rows)} × {name} on {workers} worker{'s' * (workers > 1)}", len(rows)) as update:
        stream = label_stream(
            ref.adapter,
            ref.settings,
            structures,
            run_dirs,
            workers=workers,
            threads=ref.threads_per_worker,
            timeout_s=ref.timeout_s,
        )
        for done, (i, result) in enumerate(stream, 1):
            recorded = record_or_adopt(
                ctx.sessions, ctx.store, structure_ids[i], result, name, ref.settings, iteration_id
            )
            if not recorded:  # another campaign sharing the database recorded it while this one computed
                reused += 1
            else:
                counts[result.status] = counts.get(result.status, 0) + 1
                if not result.ok:
                    get_run_logger().warning(
                        "calculation of structure %s: %s (%s)", structure_ids[i], result.status, result.error
                    )
            update(done, len(rows))
    return counts, reused


def _close(ctx: Context, campaign_id: int, index: int, counts: dict[str, int], reused: int) -> None:
    with session_scope(ctx.sessions) as session:
        iteration_row(session, campaign_id, index).status = "labelled"
    get_run_logger().info(
        "iteration %d labelled with %s: %s%s",
        index,
        ctx.adapter.name,
        counts or "nothing new",
        f" ({reused} labels already in the database)" if reused else "",
    )


@task(name="label", task_run_name=run_name("label", label_count), tags=[LABEL_TAG])
@tracked
def label_task(config_path: str, campaign_id: int, index: int) -> dict[str, int]:
    """Reference calculations of the iteration's chosen structures on ``reference.workers``
    local workers, or as AiiDA jobs (``reference.dispatch.engine: aiida``), each committed as it ends."""
    ctx = context(config_path)
    iteration_id, pending, reused = _pending(ctx, campaign_id, index)
    if iteration_id is None:
        return {}
    if ctx.config.reference.dispatch.engine == "aiida":
        from ionflow.flows.remote import remote_label

        counts, raced = remote_label(ctx, campaign_id, index, iteration_id, pending)
    else:
        counts, raced = _compute(ctx, pending, index, iteration_id, ctx.config.reference.workers)
    _close(ctx, campaign_id, index, counts, reused + raced)
    return counts


@task(name="label-plan", task_run_name=run_name("label-plan"))
@tracked
def label_plan_task(config_path: str, campaign_id: int, index: int) -> tuple[int | None, list[int], int]:
    """The distributed label step's first part: what is still to compute (ids only)."""
    return _pending(context(config_path), campaign_id, index)


@task(name="label-chunk", task_run_name=run_name("label-chunk", chunk))
def label_chunk_task(
    config_path: str, index: int, iteration_id: int, structure_ids: list[int]
) -> tuple[dict[str, int], int]:
    """Label a chunk of structures where the task runs (a Dask worker), one calculation at a
    time, each committed to the database as it ends; return (counts, raced)."""
    ctx = context(config_path)
    return _compute(ctx, structure_ids, index, iteration_id, workers=1)


@task(name="label-close", task_run_name=run_name("label-close"))
@tracked
def label_close_task(config_path: str, campaign_id: int, index: int, counts: dict[str, int], reused: int) -> None:
    _close(context(config_path), campaign_id, index, counts, reused)


def label_step(config_path: str, campaign_id: int, index: int) -> None:
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


def too_many_failures(config_path: str, campaign_id: int) -> str | None:
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
