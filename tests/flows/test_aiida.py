"""Reference calculations through AiiDA against real parts: a PostgreSQL + RabbitMQ profile, its
daemon, and a ``localhost`` computer (``core.local`` + ``core.direct``) whose jobs run
``ionflow label-batch`` (see ``aiida_setup``)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.flows.conftest import tiny_campaign, write_campaign

pytestmark = pytest.mark.slow


def _dispatch(env: dict, **changes) -> dict:
    return {
        "engine": "aiida",
        "profile": env["profile"],
        "computer": env["computer"],
        "code": env["code"],
        "batch_size": 4,
        "poll_interval_s": 0.5,
        **changes,
    }


def _rows(db: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _nodes(db: Path):  # noqa: ANN202
    """The AiiDA jobs of the campaign in the SQLite database ``db`` (found by their extras)."""
    from aiida import orm

    campaign_id = _rows(db, "SELECT id FROM campaign")[0][0]
    filters = {"extras.ionflow_campaign_id": campaign_id, "extras.ionflow_database": f"sqlite:///{db.resolve()}"}
    query = orm.QueryBuilder().append(orm.CalcJobNode, filters=filters)
    return [n for (n,) in query.all()]


def test_a_campaign_labels_through_aiida_exactly_as_it_would_locally(tmp_path, prefect_server, aiida_localhost):
    from ionflow.cli import app
    from ionflow.flows.campaign import campaign_flow

    remote_cfg = tiny_campaign(tmp_path / "remote", iterations=1)
    remote_cfg["reference"]["dispatch"] = _dispatch(aiida_localhost)
    local_cfg = tiny_campaign(tmp_path / "local", iterations=1)
    remote_db = tmp_path / "remote" / "runs" / "tiny" / "ionflow.db"
    # the AiiDA daemon is killed while the first jobs run: the label step starts it again
    killed: list[int] = []

    def kill_daemon_mid_batch() -> None:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            try:
                if remote_db.exists() and _rows(remote_db, "SELECT id FROM remote_job WHERE state = 'running'"):
                    killed.append(_kill_daemon())
                    return
            except sqlite3.OperationalError:  # the schema is being made
                pass
            time.sleep(0.1)

    killer = threading.Thread(target=kill_daemon_mid_batch, daemon=True)
    killer.start()
    summary = campaign_flow(str(write_campaign(tmp_path, remote_cfg, "remote.yaml")))
    killer.join()
    assert killed and killed[0] >= 2
    assert summary["status"] == "finished", summary
    campaign_flow(str(write_campaign(tmp_path, local_cfg, "local.yaml")))

    local_db = tmp_path / "local" / "runs" / "tiny" / "ionflow.db"
    sql = (
        "SELECT s.hash, c.status, c.energy, c.code_version, c.settings_hash, c.run_dir, c.aiida_uuid, "
        "c.remote_job_id, c.id, c.structure_id FROM calculation c JOIN structure s ON s.id = c.structure_id"
    )
    remote = {r[0]: r for r in _rows(remote_db, sql)}
    local = {r[0]: r for r in _rows(local_db, sql)}
    # the same structures (same MD, hence the same labels and models) with bit-identical labels
    assert set(remote) == set(local) and len(remote) == 12
    for key, row in remote.items():
        assert row[1:5] == local[key][1:5]
        assert row[5].startswith("localhost:" + str(aiida_localhost["work"]))  # COMPUTER:/path of the job's run
        assert row[6] and row[7] and local[key][6] is None
    jobs = _rows(remote_db, "SELECT id, state, node_uuid, exit_status, structure_ids FROM remote_job")
    assert len(jobs) == 3 + 1  # bootstrap 9 in batches of 4, then iteration 1's 3
    assert {j[1] for j in jobs} == {"collected"} and {j[3] for j in jobs} == {0}

    # both ways: each node knows the campaign and its calculation rows; each row its node
    from aiida import orm

    nodes = _nodes(remote_db)
    assert sorted(n.uuid for n in nodes) == sorted(j[2] for j in jobs)
    by_uuid: dict[str, dict[str, int]] = {}
    for row in remote.values():
        by_uuid.setdefault(row[6], {})[str(row[9])] = row[8]
    for node in nodes:
        assert node.process_type == "aiida.calculations:ionflow.label" and node.is_finished_ok
        assert node.base.extras.get("ionflow_campaign") == "tiny"
        assert node.base.extras.get("ionflow_calculation_ids") == by_uuid[node.uuid]
        assert node.outputs.summary.get_dict()["counts"] == {"ok": len(by_uuid[node.uuid])}
        assert orm.load_node(node.uuid).computer.label == "localhost"

    # ionflow lineage shows the node of each label
    result = CliRunner().invoke(app, ["lineage", str(remote_db.parent), "--model", "v1", "--json"])
    assert result.exit_code == 0, result.output
    members = json.loads(result.output)["members"]
    assert members and all(m["aiida_uuid"] == remote[m["structure_hash"]][6] for m in members)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"computer": "nowhere"}, "no computer 'nowhere'"),
        ({"code": "absent"}, "code 'absent'"),
        ({"profile": "no-such-profile"}, "no-such-profile"),
        ({"options": {"max_wallclock_seconds": "an hour"}}, "max_wallclock_seconds"),
        ({"options": {"resources": {"num_machines": 0}}}, "resources"),
        ({"options": {"queue": "debug"}}, "unknown job option(s) queue"),
    ],
)
def test_a_target_aiida_cannot_use_is_refused_before_any_work(tmp_path, aiida_localhost, changes, message):
    from ionflow.cli import app

    config = tiny_campaign(tmp_path)
    config["reference"]["dispatch"] = _dispatch(aiida_localhost, **changes)
    result = CliRunner().invoke(app, ["run", str(write_campaign(tmp_path, config))])
    assert result.exit_code == 2, result.output
    assert "reference.dispatch" in result.output and message in result.output
    assert not (tmp_path / "runs").exists()  # nothing started


def _run(path: Path, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect")}
    return subprocess.Popen(
        [sys.executable, "-m", "ionflow.cli", "run", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(condition, timeout: float, proc: subprocess.Popen | None = None) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the campaign ended first:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def _kill_daemon() -> int:
    """SIGKILL the test profile's daemon: its circus arbiter (from the PID file) and the workers
    and watchers it started; return how many processes were killed."""
    from aiida.engine.daemon.client import get_daemon_client

    pid = get_daemon_client().get_daemon_pid()
    assert pid is not None, "the daemon is not running"
    return _kill_tree(pid)


def _kill_tree(pid: int) -> int:
    import psutil

    parent = psutil.Process(pid)
    tree = [*parent.children(recursive=True), parent]
    for p in tree:
        p.kill()
    return len(tree)


def test_a_campaign_and_the_daemon_killed_mid_batch_leave_every_calculation_once(tmp_path, aiida_localhost):
    """The campaign is killed (SIGKILL) while its jobs run, the AiiDA daemon too; one job's row is
    put back to the moment between submitting and recording the node. Run again, the campaign
    follows the jobs it had (finding that one by its key), starts the daemon, and finishes with
    every structure labelled once and no job submitted twice."""
    config = tiny_campaign(tmp_path, iterations=1)
    # each job waits a few seconds before labelling, so the kills land while the jobs run
    config["reference"]["dispatch"] = _dispatch(aiida_localhost, batch_size=3, options={"prepend_text": "sleep 4"})
    path = write_campaign(tmp_path, config)
    db = tmp_path / "runs" / "tiny" / "ionflow.db"
    first = _run(path, tmp_path)
    try:

        def submitted() -> bool:
            try:
                return db.exists() and len(_rows(db, "SELECT id FROM remote_job WHERE state = 'running'")) == 3
            except sqlite3.OperationalError:  # the schema is being made
                return False

        _wait_for(submitted, timeout=180, proc=first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert _kill_daemon() >= 2
    assert _rows(db, "SELECT COUNT(*) FROM calculation") == [(0,)]  # killed before any job ended
    # killed between submitting a job and recording its node: only the row's key leads to it
    conn = sqlite3.connect(db)
    conn.execute("UPDATE remote_job SET state = 'submitting', node_uuid = NULL, node_pk = NULL WHERE id = 2")
    conn.commit()
    conn.close()

    second = _run(path, tmp_path)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    calcs = _rows(db, "SELECT structure_id, status, remote_job_id, aiida_uuid FROM calculation")
    structures = [c[0] for c in calcs]
    assert len(structures) == len(set(structures)) == 9 + 3
    assert {c[1] for c in calcs} == {"ok"}
    jobs = _rows(db, "SELECT id, state, node_uuid FROM remote_job ORDER BY id")
    assert [j[1] for j in jobs] == ["collected"] * 4
    nodes = _nodes(db)
    assert sorted(n.uuid for n in nodes) == sorted(j[2] for j in jobs)  # no job submitted twice
    assert all(n.is_finished_ok for n in nodes)


def test_a_lost_job_and_a_failing_remote_end_in_recorded_statuses(tmp_path, prefect_server, aiida_localhost):
    """A job lost by the scheduler (its process killed) and a job whose remote side fails each
    end with every structure recorded as failed, naming the AiiDA process, and the campaign stops
    with its failure report instead of waiting for ever."""
    from aiida import orm

    from ionflow.flows.campaign import campaign_flow

    # the remote side fails: the job script exits before ionflow runs
    config = tiny_campaign(tmp_path / "broken", iterations=1)
    config["reference"]["dispatch"] = _dispatch(aiida_localhost, options={"prepend_text": "exit 7"})
    summary = campaign_flow(str(write_campaign(tmp_path, config, "broken.yaml")))
    assert summary["status"] == "stopped" and "failed" in summary["stop_reason"]
    db = tmp_path / "broken" / "runs" / "tiny" / "ionflow.db"
    calcs = _rows(db, "SELECT status, error, aiida_uuid FROM calculation")
    assert len(calcs) == 9 and {c[0] for c in calcs} == {"failed"}
    assert all("AiiDA process" in c[1] and c[2] in c[1] for c in calcs)
    assert {r[0] for r in _rows(db, "SELECT exit_status FROM remote_job")} == {350}

    # a job lost by the scheduler: its process is killed while it runs
    config = tiny_campaign(tmp_path / "lost", iterations=1)
    config["reference"]["dispatch"] = _dispatch(aiida_localhost, batch_size=9, options={"prepend_text": "sleep 30"})
    path = write_campaign(tmp_path, config, "lost.yaml")
    db = tmp_path / "lost" / "runs" / "tiny" / "ionflow.db"
    proc = _run(path, tmp_path)

    def job_started() -> bool:
        try:
            rows = db.exists() and _rows(db, "SELECT node_uuid FROM remote_job WHERE state = 'running'")
        except sqlite3.OperationalError:  # the schema is being made
            return False
        return bool(rows) and orm.load_node(rows[0][0]).get_job_id() is not None

    _wait_for(job_started, timeout=180, proc=proc)
    node = orm.load_node(_rows(db, "SELECT node_uuid FROM remote_job")[0][0])
    _kill_tree(int(node.get_job_id()))  # core.direct: the job id is the job script's process id
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out  # stopped: too many failures, with the table
    calcs = _rows(db, "SELECT status, error FROM calculation")
    assert len(calcs) == 9 and {c[0] for c in calcs} == {"failed"}
    assert all(f"AiiDA process {node.pk}" in c[1] for c in calcs)
    assert orm.load_node(node.uuid).exit_status == 350


def test_a_campaign_labels_on_slurm_over_ssh(tmp_path, prefect_server, aiida_slurm):
    """The cluster case: jobs go over SSH (core.ssh, 127.0.0.1) to SLURM (core.slurm, one node)."""
    from aiida import orm

    from ionflow.flows.campaign import campaign_flow

    config = tiny_campaign(tmp_path, iterations=1)
    config["reference"]["dispatch"] = _dispatch(
        aiida_slurm,
        batch_size=5,
        options={
            "resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1},
            "max_wallclock_seconds": 600,
            "queue_name": "debug",
        },
    )
    summary = campaign_flow(str(write_campaign(tmp_path, config)))
    assert summary["status"] == "finished", summary
    db = tmp_path / "runs" / "tiny" / "ionflow.db"
    calcs = _rows(db, "SELECT status, aiida_uuid, run_dir FROM calculation")
    assert len(calcs) == 12 and {c[0] for c in calcs} == {"ok"}
    assert all(c[2].startswith(f"slurm-ssh:{aiida_slurm['work']}") for c in calcs)
    jobs = _rows(db, "SELECT node_uuid, computer, exit_status FROM remote_job")
    assert len(jobs) == 2 + 1 and {(j[1], j[2]) for j in jobs} == {("slurm-ssh", 0)}
    for uuid_, _, _ in jobs:
        node = orm.load_node(uuid_)
        assert node.computer.transport_type == "core.ssh" and node.computer.scheduler_type == "core.slurm"
        assert node.get_job_id().isdigit()  # a SLURM job id
        assert "#SBATCH" in node.base.repository.get_object_content("_aiidasubmit.sh")
