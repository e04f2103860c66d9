"""Broken campaign files, generated from the quickstart: ``ionflow validate`` refuses every one
with exit status 2 and names the field by its dotted path (``explore.temperature_K``).

The fields come from the config models themselves (every section, and the settings of each
in-process adapter), so a field added later is covered without editing this file. The bulk runs
the command in-process (typer's CliRunner); one case runs the real ``ionflow`` process.
"""

from __future__ import annotations

import copy
import functools
import math
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from ionflow.cli import app
from ionflow.config import DATABASE_URL_VARIABLE, CampaignConfig
from ionflow.dft_adapters import settings_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart.yaml"
#: Adapters whose numeric settings are generated (the ase adapter has none).
ADAPTERS = ("pyscf", "tblite")
#: Fields where -1 is a sensible value.
NEGATIVE_ALLOWED = {"system.charge"}
#: Numbers no field may take, besides a huge one of the field's kind (1e300 would not even
#: pass as an int, while 10**30 written out in YAML does).
ABSURD = (-1e300, math.nan, math.inf, -math.inf)

runner = CliRunner()
Path_ = tuple[str, ...]


@functools.cache
def quickstart() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def campaign(adapter: str = "pyscf") -> dict[str, Any]:
    """The quickstart campaign (valid), with the reference adapter ``adapter`` at its defaults."""
    raw = copy.deepcopy(quickstart())
    if adapter != "pyscf":
        raw["reference"] = {"adapter": adapter, "settings": {}}
    return raw


def fields(model: type[BaseModel], prefix: Path_ = ()) -> list[tuple[Path_, Any]]:
    """(path, annotation) of every setting of ``model``, sections entered."""
    out = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += fields(field.annotation, path)
        else:
            out.append((path, field.annotation))
    return out


def all_fields() -> list[tuple[str, Path_, Any]]:
    """(adapter of the base campaign, path, annotation) of every campaign and adapter setting."""
    out = [("pyscf", path, annotation) for path, annotation in fields(CampaignConfig)]
    for adapter in ADAPTERS:
        out += [(adapter, path, ann) for path, ann in fields(settings_model(adapter), ("reference", "settings"))]
    return out


def huge(annotation: Any) -> int | float | None:
    """A number far too large for a numeric field (None for other fields)."""
    kinds = typing.get_args(annotation) or (annotation,)
    return 10**30 if int in kinds else 1e300 if float in kinds else None


def with_value(raw: dict, path: Path_, value: Any) -> dict:
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return raw


def refused(tmp_path: Path, raw: Any, *words: str, env: dict[str, str] | None = None, text: str | None = None) -> str:
    """Validate ``raw`` (or the file text ``text``) with the CLI: exit 2, every word in the output."""
    path = tmp_path / "broken.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", str(path)], env=env)
    assert result.exit_code == 2, result.output
    assert str(path) in result.output, result.output
    for word in words:
        assert word in result.output, result.output
    return result.output


def number_cases() -> list:
    cases = []
    for adapter, path, annotation in all_fields():
        if (too_big := huge(annotation)) is None:
            continue
        dotted = ".".join(path)
        values = (too_big, *ABSURD) if dotted in NEGATIVE_ALLOWED else (too_big, *ABSURD, -1)
        for value in values:
            cases.append(pytest.param(adapter, path, value, id=f"{dotted}={value:g}"))
    return cases


@pytest.mark.parametrize(("adapter", "path", "value"), number_cases())
def test_absurd_numbers_are_refused(tmp_path, adapter, path, value):
    refused(tmp_path, with_value(campaign(adapter), path, value), ".".join(path) + ":")


@pytest.mark.parametrize(("adapter", "path"), [pytest.param(a, p, id=".".join(p)) for a, p, _ in all_fields()])
def test_wrong_types_are_refused(tmp_path, adapter, path):
    # a mapping is the wrong type for every setting but the mappings (settings, an inline structure, job options)
    mappings = {("reference", "settings"), ("system", "structure"), ("reference", "dispatch", "options")}
    wrong = ["not", "a", "mapping"] if path in mappings else {"x": 1}
    refused(tmp_path, with_value(campaign(adapter), path, wrong), ".".join(path))


def test_text_for_a_number_is_refused(tmp_path):
    refused(tmp_path, with_value(campaign(), ("explore", "temperature_K"), "warm"), "explore.temperature_K:")
    refused(tmp_path, with_value(campaign(), ("seed",), 1.5), "seed:")


def sections(raw: dict, prefix: Path_ = ()) -> list[Path_]:
    """Paths of every mapping in a campaign, itself included."""
    out = [prefix]
    for key, value in raw.items():
        if isinstance(value, dict):
            out += sections(value, (*prefix, key))
    return out


@pytest.mark.parametrize(
    ("adapter", "section"),
    [pytest.param(a, s, id=f"{a}:{'.'.join(s) or 'top'}") for a in ADAPTERS for s in sections(campaign(a))]
    + [pytest.param("pyscf", (name,), id=name) for name in ("execution", "bootstrap") if name not in campaign()],
)
def test_an_unknown_key_is_refused_at_every_level(tmp_path, adapter, section):
    raw = with_value(campaign(adapter), (*section, "colour"), "red")
    refused(tmp_path, raw, ".".join((*section, "colour")) + ": unknown key")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: [unclosed\n", ["not valid YAML"]),
        ("- a\n- b\n", ["mapping"]),
        ("just a string\n", ["mapping"]),
        ("", ["mapping"]),
    ],
    ids=["broken-yaml", "a-list", "a-string", "empty"],
)
def test_files_that_are_not_a_mapping_are_refused(tmp_path, text, words):
    refused(tmp_path, None, *words, text=text)


def test_a_binary_file_is_refused(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_bytes(bytes(range(256)))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "not valid YAML" in result.output, result.output


@pytest.mark.parametrize(
    ("adapter", "key", "value", "words"),
    [
        ("pyscf", "basis", "def2-svq", ["reference.settings.basis:", "def2-svq", "unknown to PySCF"]),
        ("pyscf", "xc", "pbe-nosuch", ["reference.settings.xc:", "pbe-nosuch"]),
        ("pyscf", "charge_scheme", "hirshfeld", ["reference.settings.charge_scheme:"]),
        ("tblite", "method", "GFN0-xTB", ["reference.settings.method:", "GFN2-xTB", "IPEA1-xTB"]),
    ],
)
def test_settings_the_code_does_not_know_are_refused(tmp_path, adapter, key, value, words):
    refused(tmp_path, with_value(campaign(adapter), ("reference", "settings", key), value), *words)


def test_a_basis_without_the_systems_element_is_refused(tmp_path):
    raw = campaign()
    raw["system"] = {"charge": 0, "multiplicity": 2, "structure": {"symbols": ["Au"], "positions": [[0, 0, 0]]}}
    raw["reference"]["settings"]["basis"] = "6-31g"  # known to PySCF, but not for gold
    refused(tmp_path, raw, "reference.settings.basis:", "6-31g", "Au")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql+mysqldb://u@host/db", ["MySQLdb", "not installed"]),
        ("oracle://u@host/db", ["oracledb", "not installed"]),
        ("nosuchdb://u@host/db", ["nosuchdb"]),
        ("postgresql+asyncpg://u@host/db", ["asyncio"]),
        ("sqlite+aiosqlite:///prov.db", ["asyncio"]),
        ("not a url", ["not a database URL"]),
    ],
)
def test_a_database_url_ionflow_cannot_open_is_refused(tmp_path, monkeypatch, url, words):
    monkeypatch.delenv(DATABASE_URL_VARIABLE, raising=False)
    refused(tmp_path, {**campaign(), "database_url": url}, "database_url:", *words)
    # the same URL in the environment, when the file has none
    refused(tmp_path, campaign(), "database_url:", DATABASE_URL_VARIABLE, *words, env={DATABASE_URL_VARIABLE: url})


def test_usable_database_urls_pass(tmp_path, monkeypatch):
    monkeypatch.delenv(DATABASE_URL_VARIABLE, raising=False)
    for url in ("postgresql+psycopg://u@host/db", "postgresql://u@host/db", f"sqlite:///{tmp_path / 'p.db'}"):
        path = tmp_path / "ok.yaml"
        path.write_text(yaml.safe_dump({**campaign(), "database_url": url}))
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, result.output


def test_the_ionflow_process_exits_with_status_2(tmp_path):
    """The real command, not typer's runner: the exit status a shell sees."""
    path = tmp_path / "hot.yaml"
    path.write_text(yaml.safe_dump(with_value(campaign(), ("explore", "temperature_K"), 1e300)))
    done = subprocess.run(
        [sys.executable, "-m", "ionflow.cli", "validate", str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "explore.temperature_K:" in done.stderr and "10000" in done.stderr


def test_an_incomplete_or_contradictory_dispatch_is_refused(tmp_path):
    aiida = {"engine": "aiida", "computer": "cluster"}
    refused(tmp_path, with_value(campaign(), ("reference", "dispatch"), aiida), "reference.dispatch", "needs code")
    local = {"engine": "local", "computer": "cluster"}
    refused(tmp_path, with_value(campaign(), ("reference", "dispatch"), local), "set engine: aiida")
    both = with_value(campaign(), ("reference", "dispatch"), {**aiida, "code": "ionflow"})
    both["execution"] = {"task_runner": "dask"}
    refused(tmp_path, both, "choose one")


def test_foundation_options_without_a_foundation_or_its_file_are_refused(tmp_path):
    for path, value, words in (
        (("training", "frozen_layers"), 1, "training.frozen_layers needs model.foundation"),
        (("training", "replay_file"), "replay.extxyz", "training.replay_file needs model.foundation"),
        (("bootstrap", "source"), "foundation_md", "bootstrap.source foundation_md needs model.foundation"),
        (("model", "foundation_sha256"), "a" * 64, "pins model.foundation, which is not set"),
        (("model", "foundation"), "absent.model", "model.foundation: no such file"),
    ):
        refused(tmp_path, with_value(campaign(), path, value), *words.split(": "))
    (tmp_path / "found.model").write_bytes(b"x")
    broken = with_value(campaign(), ("model", "foundation"), "found.model")
    refused(tmp_path, with_value(broken, ("training", "replay_file"), "absent.extxyz"), "training.replay_file")
