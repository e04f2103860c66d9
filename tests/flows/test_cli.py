"""The command line: validation before any work, status from the database."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ionflow.cli import app

from .conftest import tiny_campaign, write_campaign

runner = CliRunner()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"colour": "blue"}, ["colour", "unknown key"]),
        ({"explore": {"steps": 0}}, ["explore.steps"]),
        ({"model": {"ensemble_size": 1}}, ["model.ensemble_size"]),
        ({"system": {"charge": 0}}, ["electrons", "multiplicity"]),
        ({"system": {"multiplicity": 2}}, ["electrons", "multiplicity 2"]),
        ({"reference": {"adapter": "gaussian"}}, ["gaussian", "pyscf", "tblite"]),
        ({"reference": {"adapter": "pyscf", "settings": {"basis_set": "sto-3g"}}}, ["basis_set"]),
        ({"selection": {"threshold": 3.0, "ceiling": 2.0}}, ["ceiling", "threshold"]),
    ],
)
def test_run_refuses_bad_campaigns_before_any_work(tmp_path, change, words):
    config = tiny_campaign(tmp_path)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = write_campaign(tmp_path, config)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output
    assert str(path) in result.output
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_run_refuses_unknown_elements_and_overlaps(tmp_path):
    config = tiny_campaign(tmp_path)
    config["system"]["structure"] = {"symbols": ["Xx", "H"], "positions": [[0, 0, 0], [0, 0, 1]]}
    result = runner.invoke(app, ["run", str(write_campaign(tmp_path, config))])
    assert result.exit_code == 2 and "Xx" in result.output
    config["system"] = {"charge": 0, "structure": {"symbols": ["H", "H"], "positions": [[0, 0, 0], [0, 0, 0.05]]}}
    result = runner.invoke(app, ["run", str(write_campaign(tmp_path, config))])
    assert result.exit_code == 2 and "overlap" in result.output


BOX = {
    "symbols": ["O", "H", "H"],
    "positions": [[0, 0, 0], [0.76, 0.59, 0], [-0.76, 0.59, 0]],
    "cell": [[6, 0, 0], [0, 6, 0], [0, 0, 6]],
    "pbc": True,
}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"system": {"charge": 0, "structure": BOX}, "reference": {"adapter": "pyscf"}},
            ["periodic", "molecules only"],
        ),
        (
            {"reference": {"adapter": "ase", "settings": {"calculator": "cp2k", "command": "no-such-code -s"}}},
            ["no-such-code", "not on PATH"],
        ),
        (
            {"reference": {"adapter": "ase", "settings": {"calculator": "tblite.ase:TBLite"}}},
            ["charge 1", "charge_parameter"],
        ),
    ],
)
def test_run_refuses_a_system_the_adapter_cannot_label(tmp_path, change, words):
    config = tiny_campaign(tmp_path)
    for key, value in change.items():
        config[key] = {**config[key], **value} if key == "system" else value
    path = write_campaign(tmp_path, config)
    for command in ("validate", "run"):
        result = runner.invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert all(word in result.output for word in words), result.output
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_validate_accepts_the_quickstart():
    result = runner.invoke(app, ["validate", "examples/quickstart.yaml"])
    assert result.exit_code == 0, result.output
    assert "zundel-quickstart" in result.output


def test_status_before_a_run_says_so(tmp_path):
    path = write_campaign(tmp_path, tiny_campaign(tmp_path))
    result = runner.invoke(app, ["status", str(path)])
    assert result.exit_code == 2 and "has not run yet" in result.output


def test_database_url_comes_from_the_file_or_the_environment(tmp_path, monkeypatch):
    from ionflow.config import ConfigError, load_config

    monkeypatch.delenv("IONFLOW_DATABASE_URL", raising=False)
    path = write_campaign(tmp_path, tiny_campaign(tmp_path))
    cfg = load_config(path)
    assert cfg.default_database and cfg.db_url == f"sqlite:///{cfg.campaign_dir / 'ionflow.db'}"
    monkeypatch.setenv("IONFLOW_DATABASE_URL", "postgresql+psycopg://ionflow@db.cluster:5432/prov")
    cfg = load_config(path)
    assert not cfg.default_database and cfg.db_url == "postgresql+psycopg://ionflow@db.cluster:5432/prov"
    own = write_campaign(
        tmp_path, tiny_campaign(tmp_path, database_url=f"sqlite:///{tmp_path / 'shared.db'}"), "own.yaml"
    )
    assert load_config(own).db_url == f"sqlite:///{tmp_path / 'shared.db'}"  # the file's wins
    secret = write_campaign(
        tmp_path, tiny_campaign(tmp_path, database_url="postgresql+psycopg://u:hunter2@h/db"), "s.yaml"
    )
    with pytest.raises(ConfigError, match="password") as info:
        load_config(secret)
    assert "hunter2" not in str(info.value)


def test_db_upgrade_migrates_a_database_given_by_url_or_environment(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'prov.db'}"
    result = runner.invoke(app, ["db", "current", url])
    assert result.exit_code == 0 and "empty" in result.output
    result = runner.invoke(app, ["db", "upgrade", url])
    assert result.exit_code == 0 and "revision 0004 (was empty)" in result.output
    monkeypatch.setenv("IONFLOW_DATABASE_URL", url)
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0 and "revision 0004" in result.output and "was" not in result.output
    result = runner.invoke(app, ["db", "current"])
    assert result.output.strip() == "0004"
    result = runner.invoke(app, ["db", "upgrade", "postgresql+psycopg://nobody:pw@127.0.0.1:1/none"])
    assert (
        result.exit_code == 2 and "cannot reach" in result.output and "pw" not in result.output.replace("psycopg", "")
    )


def test_deploy_refuses_a_bad_schedule_and_a_missing_server(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    path = write_campaign(tmp_path, tiny_campaign(tmp_path))
    result = runner.invoke(app, ["deploy", str(path), "--cron", "every tuesday"])
    assert result.exit_code == 2 and "not a valid cron expression" in result.output
    result = runner.invoke(app, ["deploy", str(path)])
    assert result.exit_code == 2 and "PREFECT_API_URL" in result.output
