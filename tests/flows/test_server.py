"""A real Prefect server on 127.0.0.1, process workers on a cpu and a gpu pool, `ionflow deploy`,
and a tiny campaign run through the deployment; checked through Prefect's API and the database.
Then the cpu worker is killed (kill -9, with the flow run it was executing) in the middle of
the next campaign run, a new worker started and the deployment run again: the campaign
finishes, and no reference calculation is repeated or lost."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ionflow.db import Calculation, Campaign, Model, SelectionDecision, make_engine, session_factory, session_scope

from .conftest import tiny_campaign, write_campaign

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115  closed with the process, in _stop
    proc = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = handle  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proc.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``prefect server start`` on a free port of 127.0.0.1, with its own home and database."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    env.pop("PREFECT_API_KEY", None)
    proc = _start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, home / "server.log"
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            _stop(proc)
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield env, home
    _stop(proc)


def _descendants(pid: int) -> list[int]:
    """Every process started, directly or not, by ``pid`` (also those in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _crash(proc: subprocess.Popen) -> None:
    """kill -9 a worker and everything it started, as when its node dies."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    proc.log.close()


def _worker(env, home: Path, pool: str, name: str) -> subprocess.Popen:
    return _start(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name],
        env,
        home / f"{name}.log",
    )


def _run_deployment(env, name: str, timeout_s: float = 400):
    """Create a flow run of deployment ``name`` through the API and wait for a final state."""
    code = f"""
import sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
run = run_deployment({name!r}, timeout=0, as_subflow=False)
print(run.id, flush=True)
with get_client(sync_client=True) as client:
    deadline = time.monotonic() + {timeout_s}
    while time.monotonic() < deadline:
        state = client.read_flow_run(run.id).state
        if state is not None and state.is_final():
            print(state.type.value, flush=True)
            sys.exit(0)
        time.sleep(1)
print("TIMEOUT", flush=True)
"""
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _flow_runs(env) -> list[dict]:
    code = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs()
    flows = {f.id: f.name for f in client.read_flows()}
    print(json.dumps([{"flow": flows[r.flow_id], "state": r.state.type.value, "tags": r.tags, "parent": str(r.parent_task_run_id)} for r in runs]))
    limits = client.read_concurrency_limits(limit=10, offset=0)
    print(json.dumps([{"tag": c.tag, "limit": c.concurrency_limit} for c in limits]))
    print(json.dumps([{"name": t.name, "tags": t.tags} for t in client.read_task_runs()]))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    import json

    runs, limits, tasks = (json.loads(line) for line in out.stdout.strip().splitlines()[-3:])
    return runs, limits, tasks


def test_deployed_campaign_runs_on_work_pools_and_survives_a_killed_worker(server, tmp_path):
    env, home = server
    config = tiny_campaign(tmp_path, iterations=1)
    path = write_campaign(tmp_path, config)
    deployed = subprocess.run(
        [str(BIN / "ionflow"), "deploy", str(path), "--label-concurrency", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "ionflow-campaign/tiny on pool cpu" in deployed.stdout and "ionflow-gpu-step/tiny" in deployed.stdout

    cpu, gpu = _worker(env, home, "cpu", "cpu-1"), _worker(env, home, "gpu", "gpu-1")
    try:
        waiter = _run_deployment(env, "ionflow-campaign/tiny")
        out, err = waiter.communicate(timeout=600)
        assert out.strip().endswith("COMPLETED"), out + err + (home / "cpu-1.log").read_text()[-4000:]

        runs, limits, tasks = _flow_runs(env)
        by_flow = {}
        for run in runs:
            by_flow.setdefault(run["flow"], []).append(run)
        assert [r["state"] for r in by_flow["ionflow-campaign"]] == ["COMPLETED"]
        # bootstrap training, then exploration and training of iteration 1: on the gpu pool
        gpu_runs = by_flow["ionflow-gpu-step"]
        assert len(gpu_runs) == 3 and all(r["state"] == "COMPLETED" for r in gpu_runs)
        assert all(r["parent"] != "None" for r in gpu_runs)  # sub-flow runs of the campaign
        assert {"tag": "ionflow-label", "limit": 1} in limits
        label_runs = [t for t in tasks if t["name"].startswith("label · ")]
        assert len(label_runs) == 2 and all("ionflow-label" in t["tags"] for t in label_runs)  # the limit applies

        engine = make_engine(f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'ionflow.db'}")
        with session_scope(session_factory(engine)) as session:
            assert session.scalar(select(Campaign.status)) == "finished"
            assert session.scalar(select(func.count()).select_from(Model)) == 2
            first_calcs = session.scalar(select(func.count()).select_from(Calculation))
        engine.dispose()

        # one more iteration; kill -9 the cpu worker (and the campaign it runs) while it labels
        config["iterations"] = 2
        write_campaign(tmp_path, config)
        waiter = _run_deployment(env, "ionflow-campaign/tiny", timeout_s=60)
        dft = tmp_path / "runs" / "tiny" / "dft"
        before = len(list(dft.iterdir()))
        deadline = time.monotonic() + 300
        while len(list(dft.iterdir())) == before and time.monotonic() < deadline:
            time.sleep(0.2)  # iteration 2's first calculation has started
        assert len(list(dft.iterdir())) > before, (home / "cpu-1.log").read_text()[-3000:]
        _crash(cpu)
        waiter.kill()
        waiter.wait()

        cpu = _worker(env, home, "cpu", "cpu-2")
        waiter = _run_deployment(env, "ionflow-campaign/tiny")
        out, err = waiter.communicate(timeout=600)
        assert out.strip().endswith("COMPLETED"), out + err + (home / "cpu-2.log").read_text()[-4000:]
        # a recurring campaign: the schedule is the deployment's
        redeployed = subprocess.run(
            [str(BIN / "ionflow"), "deploy", str(path), "--cron", "0 3 * * *"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert redeployed.returncode == 0 and "schedule 0 3 * * *" in redeployed.stdout, redeployed.stderr
        code = (
            "from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    d = c.read_deployment_by_name('ionflow-campaign/tiny')\n"
            "    print([s.schedule.cron for s in d.schedules], d.parameters['config_path'])"
        )
        shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert shown.stdout.strip() == f"['0 3 * * *'] {path.resolve()}", shown.stderr
    finally:
        _stop(cpu)
        _stop(gpu)

    engine = make_engine(f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'ionflow.db'}")
    with session_scope(session_factory(engine)) as session:
        assert session.scalar(select(Campaign.status)) == "finished"
        assert session.scalar(select(func.count()).select_from(Model)) == 3  # v0..v2
        calcs = session.scalar(select(func.count()).select_from(Calculation))
        distinct = session.scalar(select(func.count(func.distinct(Calculation.structure_id))))
        chosen = session.scalar(
            select(func.count()).select_from(SelectionDecision).where(SelectionDecision.chosen.is_(True))
        )
        assert calcs == distinct  # none repeated
        bootstrap = config["bootstrap"]["n_train"] + config["bootstrap"]["n_test"]
        assert calcs == bootstrap + chosen > first_calcs  # the bootstrap and every chosen frame: none lost
    engine.dispose()
    # every calculation's folder holds its result: nothing half-done was left behind
    assert all((d / "result.json").is_file() for d in (tmp_path / "runs" / "tiny" / "dft").iterdir())
