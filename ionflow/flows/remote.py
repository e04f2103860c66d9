"""The label step through AiiDA (``reference.dispatch.engine: aiida``): the chosen structures go
in batches of ``batch_size`` to ``ionflow.label`` calculation jobs on an AiiDA computer, where
``ionflow label-batch`` labels them with the same adapter, settings, timeout and failure policy as
a local label step; the step polls the jobs and records each batch's results as the job ends.

Exactly once, whatever is killed when:

* a batch's ``remote_job`` row is committed (``submitting``) before its job is submitted, and the
  job carries the row's key as its AiiDA label; a resumed label step looks every ``submitting``
  row up in AiiDA by that key: found, it follows the job; not found, the job was never submitted
  and its structures are submitted again;
* ``running`` jobs are followed, never submitted again; a job that ends without a result for some
  structure (killed, lost by the scheduler, out of walltime, its process excepted) records that
  structure as ``failed`` (``timeout`` for walltime) with the AiiDA process named in the error;
* results are recorded with the calculation's unique key (structure, settings hash), so a batch
  collected twice (the step killed while collecting) adopts what is there instead of duplicating;
* the AiiDA daemon is started when it is not running (a killed daemon's jobs resume from AiiDA's
  checkpoints once it runs again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import get_run_logger
from sqlalchemy import select

from ionflow.db import Structure, session_scope, utcnow
from ionflow.db.models import Calculation, Campaign, RemoteJob
from ionflow.db.records import record_or_adopt
from ionflow.db.session import shown_url
from ionflow.dft_adapters.base import LabelResult
from ionflow.dft_adapters.batch import batch_parameters, structures_text
from ionflow.flows.context import Context
from ionflow.flows.report import stage


@dataclass
class _Job:
    id: int
    structure_ids: list[int]
    node_uuid: str


def remote_label(
    ctx: Context, campaign_id: int, index: int, iteration_id: int, pending: list[int]
) -> tuple[dict[str, int], int]:
    """Label ``pending`` through AiiDA (see the module docstring); return (counts per status,
    results another writer recorded first)."""
    from ionflow.dft_adapters.aiida import dispatch

    d = ctx.config.reference.dispatch
    log = get_run_logger()
    target = dispatch.check_target(d.profile, d.computer, d.code, d.options)
    if dispatch.ensure_daemon():
        log.info("started the daemon of AiiDA profile %s", target.profile)
    jobs = _open_jobs(ctx, iteration_id, dispatch)
    covered = {i for job in jobs for i in job.structure_ids}
    todo = [i for i in pending if i not in covered]
    if jobs:
        log.info("following %d AiiDA job(s) submitted before: %s", len(jobs), ", ".join(j.node_uuid for j in jobs))
    for start in range(0, len(todo), d.batch_size):
        jobs.append(
            _submit(ctx, dispatch, target, campaign_id, index, iteration_id, todo[start : start + d.batch_size])
        )
    return _collect(ctx, dispatch, jobs, target.computer.label, iteration_id)


def _open_jobs(ctx: Context, iteration_id: int, dispatch) -> list[_Job]:  # noqa: ANN001
    """The iteration's jobs not collected yet; a ``submitting`` one is looked up in AiiDA by its
    key: followed if it was submitted, else dropped (its structures are submitted again)."""
    jobs = []
    with session_scope(ctx.sessions) as session:
        rows = session.scalars(
            select(RemoteJob)
            .where(RemoteJob.iteration_id == iteration_id, RemoteJob.state != "collected")
            .order_by(RemoteJob.id)
        ).all()
        for row in rows:
            if row.node_uuid is None:
                node = dispatch.find_batch(row.key)
                if node is None:  # the step was killed between writing the row and submitting
                    session.delete(row)
                    continue
                row.node_uuid, row.node_pk, row.state, row.submitted_at = node.uuid, node.pk, "running", utcnow()
            jobs.append(_Job(row.id, list(row.structure_ids), row.node_uuid))
    return jobs


def _submit(ctx: Context, dispatch, target, campaign_id: int, index: int, iteration_id: int, ids: list[int]) -> _Job:  # noqa: ANN001
    ref = ctx.config.reference
    key = dispatch.new_key()
    with session_scope(ctx.sessions) as session:
        paths = {s.id: s.path for s in session.scalars(select(Structure).where(Structure.id.in_(ids)))}
        name = session.get(Campaign, campaign_id).name
        row = RemoteJob(
            campaign_id=campaign_id,
            iteration_id=iteration_id,
            engine="aiida",
            key=key,
            structure_ids=ids,
            state="submitting",
            profile=target.profile,
            computer=target.computer.label,
        )
        session.add(row)
        session.flush()
        job_id = row.id
    text = structures_text(ctx.store.path(paths[i]).read_text() for i in ids)
    parameters = batch_parameters(ref.adapter, ref.settings, ref.workers, ref.threads_per_worker, ref.timeout_s)
    node = dispatch.submit_batch(
        target,
        key,
        parameters,
        text,
        description=f"ionflow campaign {name}, iteration {index}: {len(ids)} structures with {ref.adapter}",
        extras={
            "ionflow_campaign": name,
            "ionflow_campaign_id": campaign_id,
            "ionflow_iteration": index,
            "ionflow_structure_ids": ids,
            "ionflow_remote_job_id": job_id,
            "ionflow_database": shown_url(ctx.config.db_url),
        },
    )
    with session_scope(ctx.sessions) as session:
        row = session.get(RemoteJob, job_id)
        row.node_uuid, row.node_pk, row.state, row.submitted_at = node.uuid, node.pk, "running", utcnow()
    get_run_logger().info("submitted AiiDA job %s (pk %d): %d structures", node.uuid, node.pk, len(ids))
    return _Job(job_id, ids, node.uuid)


def _collect(  # noqa: ANN001
    ctx: Context, dispatch, jobs: list[_Job], computer: str, iteration_id: int
) -> tuple[dict[str, int], int]:
    """Poll the jobs until each has ended and its results are recorded."""
    d = ctx.config.reference.dispatch
    ref = ctx.config.reference
    log = get_run_logger()
    missing = LabelResult(
        status="failed",
        code=ctx.adapter.name,
        code_version="unknown (no result)",
        settings_hash=ctx.adapter.settings_hash,
        wall_time_s=0.0,
    )
    counts: dict[str, int] = {}
    reused = 0
    total = sum(len(j.structure_ids) for j in jobs)
    done = 0
    started = time.monotonic()
    with stage(f"label: {total} × {ref.adapter} via AiiDA on {computer}", total) as update:
        while jobs:
            for job in list(jobs):
                node = dispatch.load_job(job.node_uuid)
                outcome = dispatch.outcome(node, len(job.structure_ids), computer, missing)
                if outcome is None:
                    continue
                for i, result in sorted(outcome.results.items()):
                    recorded = record_or_adopt(
                        ctx.sessions,
                        ctx.store,
                        job.structure_ids[i],
                        result,
                        ctx.adapter.name,
                        ref.settings,
                        iteration_id,
                        remote_job_id=job.id,
                        aiida_uuid=node.uuid,
                    )
                    if recorded:
                        counts[result.status] = counts.get(result.status, 0) + 1
                        if not result.ok:
                            log.warning(
                                "calculation of structure %s: %s (%s)",
                                job.structure_ids[i],
                                result.status,
                                result.error,
                            )
                    else:
                        reused += 1
                _close_job(ctx, job, node, outcome.exit_status)
                jobs.remove(job)
                done += len(job.structure_ids)
                update(done, total)
            if not jobs:
                break
            waited = time.monotonic() - started
            if d.max_wait_s is not None and waited > d.max_wait_s:
                raise TimeoutError(
                    f"{len(jobs)} AiiDA job(s) still running after {waited:.0f} s (reference.dispatch.max_wait_s "
                    f"{d.max_wait_s:g}): {', '.join(j.node_uuid for j in jobs)}; run the campaign again to collect them"
                )
            if dispatch.ensure_daemon():
                log.warning("the AiiDA daemon was not running (killed?): started it again; its jobs resume")
            time.sleep(d.poll_interval_s)
    return counts, reused


def _close_job(ctx: Context, job: _Job, node, exit_status: int | None) -> None:  # noqa: ANN001
    """Mark the job collected, and give its AiiDA node the ids of the calculation rows it made."""
    with session_scope(ctx.sessions) as session:
        rows = session.execute(
            select(Calculation.structure_id, Calculation.id).where(
                Calculation.structure_id.in_(job.structure_ids),
                Calculation.settings_hash == ctx.adapter.settings_hash,
            )
        ).all()
        row = session.get(RemoteJob, job.id)
        row.state, row.exit_status, row.collected_at = "collected", exit_status, utcnow()
    node.base.extras.set_many({"ionflow_calculation_ids": {str(s): c for s, c in rows}})
