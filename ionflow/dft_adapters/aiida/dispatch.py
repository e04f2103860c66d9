"""What the label step asks of AiiDA: check the target before any work, submit a batch, find a
submitted batch again, read what a finished one gave.

Nothing here touches ionflow's database: the label step (:mod:`ionflow.flows.label`) keeps the
``remote_job`` rows and records the results.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from aiida import load_profile, orm
from aiida.common.exceptions import MultipleObjectsError, NotExistent
from aiida.engine import submit

from ionflow.dft_adapters.aiida.calculation import LabelCalculation
from ionflow.dft_adapters.base import LabelResult
from ionflow.dft_adapters.batch import RESULTS_FILE, read_results

log = logging.getLogger("ionflow.aiida")

#: AiiDA's exit status for a job the scheduler ended for passing its wall-time limit.
EXIT_OUT_OF_WALLTIME = 120


class DispatchError(ValueError):
    """The AiiDA target cannot take the jobs (no such profile, computer or code; bad options)."""


def new_key() -> str:
    """A unique batch key: the AiiDA node's label, by which a resumed campaign finds the job."""
    return f"ionflow-{uuid.uuid4().hex}"


def use_profile(name: str | None) -> str:
    """Load AiiDA profile ``name`` (None: the default one) in this process; return its name."""
    from aiida.manage import get_manager

    current = get_manager().get_profile()
    if current is not None and (name is None or current.name == name):
        return current.name
    try:
        return load_profile(name, allow_switch=True).name
    except Exception as exc:  # noqa: BLE001  AiiDA raises several types for a missing or broken profile
        from aiida.manage.configuration import get_config

        try:
            known = ", ".join(get_config().profile_names) or "none"
        except Exception:  # noqa: BLE001
            known = "none (no AiiDA configuration: run `verdi presto` or `verdi profile setup`)"
        wanted = repr(name) if name else "the default AiiDA profile"
        raise DispatchError(f"cannot load {wanted}: {exc}; profiles: {known}") from None


def _code(label: str, computer: orm.Computer) -> orm.AbstractCode:
    full = label if "@" in label else f"{label}@{computer.label}"
    try:
        code = orm.load_code(full)
    except (NotExistent, MultipleObjectsError) as exc:
        raise DispatchError(
            f"code {label!r}: {exc}; create it with `verdi code create core.code.installed --label {label.split('@')[0]} "
            f"--computer {computer.label} --filepath-executable /path/to/bin/ionflow`"
        ) from None
    if code.computer is None or code.computer.uuid != computer.uuid:
        where = code.computer.label if code.computer is not None else "no computer"
        raise DispatchError(f"code {label!r} is on {where}, not on computer {computer.label!r}")
    return code


@dataclass
class Target:
    """A checked AiiDA target: profile, computer, code and job options."""

    profile: str
    computer: orm.Computer
    code: orm.AbstractCode
    options: dict[str, Any] = field(default_factory=dict)


def check_target(
    profile: str | None, computer: str, code: str, options: dict[str, Any], check_daemon: bool = True
) -> Target:
    """The target, checked before any work: the profile loads, the computer exists and is
    configured for the profile's user, the code is the ``ionflow`` executable on that computer, and
    the options are valid job options for the computer's scheduler. ``DispatchError`` names the
    first problem."""
    name = use_profile(profile)
    try:
        node = orm.load_computer(computer)
    except (NotExistent, MultipleObjectsError):
        known = ", ".join(c.label for c in orm.Computer.collection.all()) or "none"
        raise DispatchError(
            f"profile {name!r} has no computer {computer!r} (computers: {known}); set it up with "
            "`verdi computer setup` and `verdi computer configure`"
        ) from None
    user = orm.User.collection.get_default()
    if not node.is_user_configured(user):
        raise DispatchError(
            f"computer {computer!r} is not configured for {user.email}: run "
            f"`verdi -p {name} computer configure {node.transport_type} {computer}`"
        )
    the_code = _code(code, node)
    problem = _options_problem(node, the_code, options)
    if problem:
        raise DispatchError(f"options: {problem}")
    if check_daemon:
        _check_broker(name)
    resources = LabelCalculation.spec().inputs["metadata"]["options"]["resources"].default
    return Target(profile=name, computer=node, code=the_code, options={"resources": resources, **options})


def _options_problem(computer: orm.Computer, code: orm.AbstractCode, options: dict[str, Any]) -> str | None:
    """Why ``options`` are not valid job options on ``computer`` (None when they are)."""
    port = LabelCalculation.spec().inputs["metadata"]["options"]
    known = set(port.keys())
    unknown = sorted(set(options) - known)
    if unknown:
        return f"unknown job option(s) {', '.join(unknown)}; AiiDA's are: {', '.join(sorted(known))}"
    resources = options.get("resources", port["resources"].default)
    error = port.validate({**options, "resources": resources})
    if error is not None:
        return str(error)
    scheduler = computer.get_scheduler()
    try:
        scheduler.validate_resources(**resources)
    except (ValueError, TypeError) as exc:
        return f"resources {resources} for scheduler {computer.scheduler_type}: {exc}"
    return None


def _check_broker(profile: str) -> None:
    from aiida.manage import get_manager

    manager = get_manager()
    if manager.get_profile().process_control_backend is None:
        raise DispatchError(
            f"profile {profile!r} has no broker: its jobs cannot be submitted to a daemon (set one up with "
            "`verdi profile configure-rabbitmq` or make the profile with `--broker core.rabbitmq`)"
        )


def ensure_daemon(workers: int = 1) -> bool:
    """Start the profile's daemon if it is not running (a campaign's jobs advance only while it
    runs); True when it had to be started."""
    import os
    import sys

    from aiida.engine.daemon import client as daemon_client

    client = daemon_client.get_daemon_client()
    # a daemon killed with SIGKILL leaves its PID file, which is_daemon_running trusts; AiiDA's own
    # staleness check (the PID's process is gone or is not circus) tells it apart
    if client.is_daemon_running and not client._is_pid_file_stale:
        return False
    verdi = os.path.join(os.path.dirname(sys.executable), "verdi")
    if daemon_client.VERDI_BIN is None and os.path.exists(verdi):  # this environment's, when not on PATH
        daemon_client.VERDI_BIN = verdi
    client.start_daemon(number_workers=workers)
    return True


def submit_batch(
    target: Target,
    key: str,
    parameters: dict[str, Any],
    structures: str,
    description: str,
    extras: dict[str, Any],
) -> orm.CalcJobNode:
    """Submit one batch (``structures``: extxyz text) as an ``ionflow.label`` job labelled ``key``."""
    import io

    builder = LabelCalculation.get_builder()
    builder.code = target.code
    builder.parameters = orm.Dict(parameters)
    builder.structures = orm.SinglefileData(io.BytesIO(structures.encode()), filename="structures.extxyz")
    builder.metadata.label = key
    builder.metadata.description = description
    builder.metadata.options = {**target.options}
    node = submit(builder)
    node.base.extras.set_many(extras)
    return node


def find_batch(key: str) -> orm.CalcJobNode | None:
    """The job submitted with label ``key``, if it was submitted (the newest, should there be two)."""
    query = orm.QueryBuilder().append(orm.CalcJobNode, filters={"label": key}, project="*", tag="job")
    query.order_by({"job": {"ctime": "desc"}})
    rows = query.first()
    return rows[0] if rows else None


def load_job(uuid_: str) -> orm.CalcJobNode:
    return orm.load_node(uuid_)


@dataclass
class BatchOutcome:
    """What a finished job gave: one result per structure (index in the batch), and its exit status."""

    results: dict[int, LabelResult]
    exit_status: int | None


def outcome(node: orm.CalcJobNode, n: int, computer: str, missing: LabelResult) -> BatchOutcome | None:
    """The results of a terminated job (None while it runs). A structure without a result (the job
    was killed, lost by the scheduler, out of walltime, or the process excepted) gets a ``failed``
    result, or ``timeout`` when the scheduler ended the job for its wall-time limit, whose error
    names the AiiDA process; ``missing`` gives such a result its code, version and settings hash."""
    if not node.is_terminated:
        return None
    results: dict[int, LabelResult] = {}
    retrieved = node.outputs.retrieved if "retrieved" in node.outputs else None
    if retrieved is not None and RESULTS_FILE in retrieved.base.repository.list_object_names():
        results = read_results(retrieved.base.repository.get_object_content(RESULTS_FILE))
    for result in results.values():
        if result.run_dir:
            result.run_dir = f"{computer}:{result.run_dir}"
    state = node.process_state.value if node.process_state is not None else "unknown"
    message = node.exit_message or _last_line(node.exception)
    scheduler_state = node.get_scheduler_state()
    walltime = node.exit_status == EXIT_OUT_OF_WALLTIME
    why = (
        f"AiiDA process {node.pk} ({node.uuid}) {state}, exit status {node.exit_status}"
        f"{': ' + str(message) if message else ''}; scheduler state {scheduler_state}"
    )
    for i in range(n):
        if i not in results:
            results[i] = replace(
                missing,
                status="timeout" if walltime else "failed",
                error=f"no result: the job ended before this structure's calculation did ({why})",
            )
    return BatchOutcome(results=results, exit_status=node.exit_status)


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""
