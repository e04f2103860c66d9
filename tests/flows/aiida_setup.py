"""A throwaway AiiDA profile for the tests, made the way the README tells a user to: a PostgreSQL
database with the C.UTF-8 locale, ``verdi profile setup core.psql_dos`` with RabbitMQ as broker,
a ``localhost`` computer (``core.local`` transport, ``core.direct`` scheduler), the ``ionflow``
code on it, and a daemon. Removed (daemon stopped, database dropped) at the end of the session.

Needs PostgreSQL (``IONFLOW_TEST_POSTGRES_URL``, as ``.ci/run`` sets), RabbitMQ on 127.0.0.1:5672
and the ``aiida`` extra; skipped, saying which is missing, without them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

PROFILE = "ionflow-test"
BIN = Path(sys.executable).parent


def verdi(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``verdi -p PROFILE ARGS`` (``verdi ARGS`` for ``profile setup``, before the profile exists)."""
    profile = [] if args[:2] == ("profile", "setup") else ["-p", PROFILE]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the daemon runs this `verdi`
    proc = subprocess.run([str(BIN / "verdi"), *profile, *args], capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"verdi {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def ionflow_code(computer: str) -> None:
    """The ``ionflow`` code on ``computer``: this environment's executable, as a cluster's install would be."""
    verdi(
        "code",
        "create",
        "core.code.installed",
        "-n",
        "--label",
        "ionflow",
        "--computer",
        computer,
        "--filepath-executable",
        str(BIN / "ionflow"),
        "--default-calc-job-plugin",
        "ionflow.label",
    )


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _admin(url):  # noqa: ANN001, ANN202
    import psycopg

    return psycopg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password or None,
        dbname=url.database or "postgres",
        autocommit=True,
    )


@pytest.fixture(scope="session")
def aiida_localhost(tmp_path_factory):
    """``{"profile", "computer", "code", "work", "root"}`` of a ready AiiDA profile with a daemon."""
    pg = os.environ.get("IONFLOW_TEST_POSTGRES_URL")
    if not pg:
        pytest.skip("AiiDA tests need PostgreSQL: set IONFLOW_TEST_POSTGRES_URL (.ci/run does)")
    pytest.importorskip("aiida", reason="the aiida extra is not installed (pip install -e .[aiida])")
    if not _reachable("127.0.0.1", 5672):
        pytest.skip("AiiDA tests need RabbitMQ on 127.0.0.1:5672")
    from sqlalchemy.engine import make_url

    url = make_url(pg)
    root = tmp_path_factory.mktemp("aiida")
    os.environ["AIIDA_PATH"] = str(root)  # before aiida reads its configuration, here and in every child
    database = f"ionflow_aiida_{uuid.uuid4().hex[:8]}"
    with _admin(url) as conn:
        conn.execute(f"CREATE DATABASE {database} LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' TEMPLATE template0")
    try:
        verdi(
            "profile",
            "setup",
            "core.psql_dos",
            "-n",
            "--profile-name",
            PROFILE,
            "--email",
            "tests@ionflow.invalid",
            "--first-name",
            "ionflow",
            "--last-name",
            "tests",
            "--institution",
            "ionflow",
            "--database-hostname",
            url.host or "127.0.0.1",
            "--database-port",
            str(url.port or 5432),
            "--database-username",
            url.username or "postgres",
            "--database-password",
            url.password or "",
            "--database-name",
            database,
            "--repository-uri",
            f"file://{root}/repository",
            "--broker",
            "core.rabbitmq",
        )
        verdi("config", "set", "warnings.rabbitmq_version", "False")
        work = root / "work"
        verdi(
            "computer",
            "setup",
            "-n",
            "--label",
            "localhost",
            "--hostname",
            "localhost",
            "--transport",
            "core.local",
            "--scheduler",
            "core.direct",
            "--work-dir",
            str(work),
        )
        # no login shell: a login shell runs the machine's profile (pyenv's rehash, which takes a lock
        # file); the daemon killed mid-command by a test would leave that lock for every later shell
        verdi("computer", "configure", "core.local", "localhost", "-n", "--safe-interval", "0", "--no-use-login-shell")
        ionflow_code("localhost")
        from aiida import load_profile, orm
        from aiida.manage.configuration import reset_config
        from aiida.manage.configuration.settings import AiiDAConfigDir

        AiiDAConfigDir.set()  # this process reads AIIDA_PATH again (aiida may have been imported before)
        reset_config()
        load_profile(PROFILE, allow_switch=True)
        orm.load_computer("localhost").set_minimum_job_poll_interval(1.0)
        verdi("daemon", "start", "1")
        yield {"profile": PROFILE, "computer": "localhost", "code": "ionflow", "work": work, "root": root}
    finally:
        verdi("daemon", "stop", check=False)
        try:
            from aiida.manage import get_manager

            get_manager().reset_profile()  # close the profile's connections before dropping its database
        except Exception:  # noqa: BLE001
            pass
        with _admin(url) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def _script(name: str) -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["bash", str(root / "scripts" / name)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"scripts/{name} failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def aiida_slurm(aiida_localhost):
    """A second computer of the profile, ``slurm-ssh``: ``core.ssh`` to an sshd on 127.0.0.1
    (scripts/start-sshd.sh, with a key made here) and ``core.slurm`` against a single-node SLURM
    (scripts/start-slurm.sh: Debian's slurm-wlm and munge, partition ``debug``)."""
    if os.geteuid() != 0:
        pytest.skip("the sshd and SLURM of the tests are started as root")
    _script("start-sshd.sh")
    _script("start-slurm.sh")
    root = aiida_localhost["root"]
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    public = (key.with_suffix(".pub")).read_text().strip()
    authorized = Path("/root/.ssh/authorized_keys")
    authorized.parent.mkdir(mode=0o700, exist_ok=True)
    with authorized.open("a") as f:
        f.write(public + "\n")
    authorized.chmod(0o600)
    port = os.environ.get("IONFLOW_TEST_SSH_PORT", "2222")
    try:
        verdi(
            "computer",
            "setup",
            "-n",
            "--label",
            "slurm-ssh",
            "--hostname",
            "127.0.0.1",
            "--transport",
            "core.ssh",
            "--scheduler",
            "core.slurm",
            "--work-dir",
            str(root / "work-slurm"),
            "--mpiprocs-per-machine",
            "1",
        )
        verdi(
            "computer",
            "configure",
            "core.ssh",
            "slurm-ssh",
            "-n",
            "--username",
            "root",
            "--port",
            port,
            "--key-filename",
            str(key),
            "--key-policy",
            "AutoAddPolicy",
            "--no-look-for-keys",
            "--no-allow-agent",
            "--safe-interval",
            "0",
        )
        ionflow_code("slurm-ssh")
        from aiida import orm

        orm.load_computer("slurm-ssh").set_minimum_job_poll_interval(1.0)
        yield {**aiida_localhost, "computer": "slurm-ssh", "work": root / "work-slurm"}
    finally:
        lines = [line for line in authorized.read_text().splitlines() if line.strip() != public]
        authorized.write_text("".join(line + "\n" for line in lines))
