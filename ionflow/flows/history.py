"""The Prefect runs that worked on a campaign, kept in its own database (table ``prefect_run``).

Prefect's server is often temporary (started for one ``ionflow run`` and gone when it ends) and a
campaign may be resumed under several flow runs, so the campaign keeps their history itself: each
flow run and task run with its id, the API that held it, whether that server was temporary, when
it started and ended and how. Iterations link their task runs (``prefect_run.iteration_id``) and
the flow run that last worked on them (``iteration.prefect_flow_run_id``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from ionflow.db import session_scope, utcnow
from ionflow.db.models import PrefectRun
from ionflow.db.records import insert_ignore, iteration_row

F = TypeVar("F", bound=Callable[..., Any])


def _api() -> tuple[str | None, bool]:
    """(the API URL the current run talks to, whether it is a temporary server)."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url
    run = TaskRunContext.get() or FlowRunContext.get()
    url = str(run.client.api_url) if run is not None and run.client is not None else configured
    return url, not configured


def _flow_run_id() -> str | None:
    from prefect import runtime

    return str(runtime.flow_run.id) if runtime.flow_run.id else None


def record_start(
    sessions: Any, campaign_id: int, index: int | None, run_id: str, kind: str, name: str, flow_run_id: str | None
) -> None:
    """Add the run (state RUNNING) if it is not there yet (a retried task keeps its id); link an
    unfinished iteration to the flow run working on it."""
    url, temporary = _api()
    with session_scope(sessions) as session:
        iteration_id = iteration_row(session, campaign_id, index).id if index is not None else None
        insert_ignore(
            session,
            PrefectRun,
            {
                "campaign_id": campaign_id,
                "iteration_id": iteration_id,
                "run_id": run_id,
                "flow_run_id": flow_run_id,
                "kind": kind,
                "name": name,
                "api_url": url,
                "temporary_server": temporary,
                "state": "RUNNING",
                "started_at": utcnow(),
            },
            ["run_id"],
        )
        if index is not None and flow_run_id is not None:
            it = iteration_row(session, campaign_id, index)
            if it.status != "done":  # a resumed flow only looks at a finished iteration
                it.prefect_flow_run_id = flow_run_id


def record_end(sessions: Any, run_id: str, state: str) -> None:
    """Close the run: its end time and final state (COMPLETED, FAILED, ...)."""
    with session_scope(sessions) as session:
        row = session.query(PrefectRun).filter(PrefectRun.run_id == run_id).one_or_none()
        if row is not None:
            row.state, row.ended_at = state, utcnow()


def tracked(fn: F | None = None, *, index: int | None = None) -> Any:
    """Record each run of a campaign step (a Prefect task taking ``config_path``, ``campaign_id``
    and, for steps of an iteration, ``index``; ``index`` here names the iteration of a step that
    takes none, as bootstrap is iteration 0's) in the campaign's ``prefect_run`` table. Outside a
    Prefect task run (a plain call) nothing is recorded."""
    if fn is None:
        return functools.partial(tracked, index=index)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect.context import TaskRunContext

        run = TaskRunContext.get()
        if run is None:
            return fn(*args, **kwargs)
        from ionflow.flows.context import context

        bound = signature.bind(*args, **kwargs).arguments
        sessions = context(bound["config_path"]).sessions
        run_id = str(run.task_run.id)
        record_start(
            sessions, bound["campaign_id"], bound.get("index", index), run_id, "task", run.task_run.name, _flow_run_id()
        )
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            record_end(sessions, run_id, "FAILED")
            raise
        record_end(sessions, run_id, "COMPLETED")
        return result

    return wrapper  # type: ignore[return-value]


def flow_started(config_path: str, campaign_id: int) -> str | None:
    """Record the current flow run for the campaign; its id (None outside a flow run)."""
    from prefect import runtime

    from ionflow.flows.context import context

    run_id = _flow_run_id()
    if run_id is None:
        return None
    record_start(context(config_path).sessions, campaign_id, None, run_id, "flow", str(runtime.flow_run.name), None)
    return run_id


def flow_ended(config_path: str, run_id: str | None, state: str) -> None:
    if run_id is not None:
        from ionflow.flows.context import context

        record_end(context(config_path).sessions, run_id, state)


def run_name(step: str, count: Callable[[dict[str, Any]], str] | None = None) -> Callable[[], str]:
    """A task run name that says what the run does, e.g. ``label · iteration 2 · 6 structures``
    (Prefect calls it as the run starts; ``count`` words the amount of work from the parameters)."""

    def name() -> str:
        from prefect.runtime import task_run

        params = task_run.parameters
        parts = [step]
        if "index" in params:
            parts.append(f"iteration {params['index']}")
        if count is not None:
            with contextlib.suppress(Exception):  # a name must never fail the run
                parts.append(count(params))
        return " · ".join(parts)

    return name


def label_count(params: dict[str, Any]) -> str:
    """How many structures a label step of iteration ``index`` must have labels for."""
    from ionflow.db.queries import structures_to_label as wanted
    from ionflow.flows.context import context

    ctx = context(params["config_path"])
    with session_scope(ctx.sessions) as session:
        n = len(wanted(session, iteration_row(session, params["campaign_id"], params["index"])))
    return f"{n} structure{'s' * (n != 1)}"


def walkers(params: dict[str, Any]) -> str:
    from ionflow.flows.context import context

    n = context(params["config_path"]).config.explore.walkers
    return f"{n} walker{'s' * (n != 1)}"


def chunk(params: dict[str, Any]) -> str:
    n = len(params["structure_ids"])
    return f"{n} structure{'s' * (n != 1)}"
