"""``docs/schema.md`` describes the schema the migrations create, column by column.

The document is parsed as its readers see it: under ``## Tables`` and ``## Views`` each
``### name`` heading is followed by a markdown table whose rows start with a backticked column
name. A fresh SQLite database migrated to head is compared with it in both directions (every
table, view and column documented; nothing documented that does not exist), and so are the ER
diagram's relations with the foreign keys, the enumerations with ``ionflow.db.models``, and the
metrics table with :func:`ionflow.db.metrics.describe`. The example queries under ``## Views``
run on the upgraded database of the previous release (and on PostgreSQL where
IONFLOW_TEST_POSTGRES_URL is set) and each returns rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ionflow.db import make_engine, sqlite_url, upgrade
from ionflow.db import models as orm
from ionflow.db.metrics import describe
from ionflow.db.queries import CANDIDATE_ORIGINS, TEST_ORIGINS
from ionflow.db.views import VIEW_DESCRIPTIONS
from tests.db.test_migration_0003 import released

DOC = Path(__file__).parents[2] / "docs" / "schema.md"

#: Every enumeration of the schema, by the column it constrains.
ENUMS = {
    "campaign.status": orm.CAMPAIGN_STATUSES,
    "calculation.status": orm.CALCULATION_STATUSES,
    "model_training_member.split": orm.TRAINING_SPLITS,
    "selection_decision.reason_code": orm.REASON_CODES,
    "md_run.start_origin": orm.START_ORIGINS,
    "prefect_run.kind": orm.PREFECT_RUN_KINDS,
    "iteration.selection_strategy": orm.SELECTION_STRATEGIES,
    "campaign_structure.origin": (*TEST_ORIGINS, *CANDIDATE_ORIGINS, "initial"),
}


def _without_code(text: str) -> str:
    """``text`` with its fenced code blocks blanked (a ``#`` or ``|`` in them is no markup)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _sections(text: str) -> dict[str, str]:
    """``{title: body}`` of the ``## `` sections."""
    parts = re.split(r"^## +(.+?)\s*$", text, flags=re.M)
    return {title: body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def documented_columns(body: str) -> dict[str, list[str]]:
    """``{name: [column, ...]}`` of each ``### name`` subsection of a section: the backticked first
    cells of the rows of the first markdown table after the heading."""
    out: dict[str, list[str]] = {}
    parts = re.split(r"^### +(.+?)\s*$", _without_code(body), flags=re.M)
    for heading, sub in zip(parts[1::2], parts[2::2], strict=True):
        lines = sub.splitlines()
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
        assert start is not None, f"docs/schema.md: ### {heading} has no table of columns"
        rows = []
        for line in lines[start:]:
            if not line.lstrip().startswith("|"):
                break
            rows.append(_cells(line))
        assert rows[0] == ["column", "type", "meaning"], f"### {heading}: table header {rows[0]}"
        columns = []
        for row in rows[2:]:  # after the header and its |---| line
            match = re.fullmatch(r"`([^`]+)`", row[0])
            assert match, f"### {heading}: row {row} does not start with a `column`"
            assert len(row) == 3 and row[1] and row[2], f"### {heading}: row {row} needs a type and a meaning"
            columns.append(match.group(1))
        assert len(columns) == len(set(columns)), f"### {heading}: a column is documented twice"
        out[heading.strip("`")] = columns
    return out


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Inspector]:
    """An inspector of a fresh SQLite database migrated to head."""
    url = sqlite_url(tmp_path_factory.mktemp("schema") / "x.db")
    upgrade(url)
    engine = sa.create_engine(url)
    try:
        yield sa.inspect(engine)
    finally:
        engine.dispose()


def _compare(kind: str, actual: dict[str, list[str]], documented: dict[str, list[str]]) -> list[str]:
    problems = []
    for name, columns in actual.items():
        if name not in documented:
            problems.append(f"{kind} {name} has no '### {name}' section")
            continue
        problems += [
            f"{kind} {name}: column {c} is in the database but not described"
            for c in columns
            if c not in documented[name]
        ]
        problems += [
            f"{kind} {name}: column {c} is described but not in the database"
            for c in documented[name]
            if c not in columns
        ]
    problems += [f"'### {name}' describes a {kind} that does not exist" for name in documented if name not in actual]
    return problems


def test_every_table_and_column_is_described(doc: str, schema: sa.Inspector) -> None:
    tables = {
        name: [c["name"] for c in schema.get_columns(name)]
        for name in schema.get_table_names()
        if name != "alembic_version"
    }
    problems = _compare("table", tables, documented_columns(_sections(doc)["Tables"]))
    assert not problems, "docs/schema.md and the schema disagree:\n" + "\n".join(problems)


def test_every_view_and_column_is_described(doc: str, schema: sa.Inspector) -> None:
    views = {name: [c["name"] for c in schema.get_columns(name)] for name in schema.get_view_names()}
    assert set(views) == set(VIEW_DESCRIPTIONS)
    problems = _compare("view", views, documented_columns(_sections(doc)["Views"]))
    assert not problems, "docs/schema.md and the views disagree:\n" + "\n".join(problems)
    # each view's description (the one `ionflow db views` prints) opens its section
    flat = " ".join(doc.split())
    for name, description in VIEW_DESCRIPTIONS.items():
        assert description[0].upper() + description[1:] in flat, f"### {name}: description not in docs/schema.md"


def test_the_diagram_has_every_table_and_foreign_key(doc: str, schema: sa.Inspector) -> None:
    diagram = re.search(r"```mermaid\nerDiagram\n(.*?)```", doc, re.S)
    assert diagram, "docs/schema.md has no mermaid erDiagram"
    body = diagram.group(1)
    entities = set(re.findall(r"^\s*(\w+)\s*\{", body, re.M))
    relations = set(re.findall(r"^\s*(\w+)\s+[|}o]{2}--[|{o]{2}\s+(\w+)\s*:\s*\"?(\w+)\"?\s*$", body, re.M))
    tables = [t for t in schema.get_table_names() if t != "alembic_version"]
    keys = {
        (fk["referred_table"], table, column)
        for table in tables
        for fk in schema.get_foreign_keys(table)
        for column in fk["constrained_columns"]
    }
    assert entities == set(tables)
    assert relations == keys, f"missing: {sorted(keys - relations)}; not foreign keys: {sorted(relations - keys)}"


@pytest.mark.parametrize(("column", "values"), ENUMS.items(), ids=list(ENUMS))
def test_every_enumeration_value_is_described(doc: str, column: str, values: tuple[str, ...]) -> None:
    enumerations = _sections(doc)["Enumerations"]
    assert f"`{column}`" in enumerations
    missing = [v for v in values if f"`{v}`" not in enumerations]
    assert not missing, f"{column}: {missing} not in the Enumerations of docs/schema.md"


def test_the_iteration_statuses_are_described_in_order(doc: str) -> None:
    from ionflow.flows.context import ORDER

    enumerations = " ".join(_sections(doc)["Enumerations"].split())
    places = [enumerations.find(f"`{status}` (") for status in ORDER]
    assert -1 not in places and places == sorted(places), places


def test_the_metrics_table_is_describe(doc: str) -> None:
    body = _sections(doc)["Metrics"]
    rows = [_cells(line) for line in _without_code(body).splitlines() if line.startswith("| model |")]
    rows += [_cells(line) for line in _without_code(body).splitlines() if line.startswith("| iteration |")]
    documented = [(owner, key.strip("`"), meaning) for owner, key, meaning in rows]
    for owner, key, meaning in describe():
        assert f"`{key}`" in body, f"metric {key} ({owner}) is not in docs/schema.md"
        assert (owner, key, meaning) in documented, f"metric {key}: not described as {meaning!r}"
    assert sorted(documented) == sorted(describe()), "the metrics table has rows describe() does not list"


def view_examples(doc: str) -> list[str]:
    """The ``sql`` code blocks under ``## Views``."""
    return re.findall(r"^```sql\n(.*?)^```", _sections(doc)["Views"], flags=re.M | re.S)


def test_every_view_has_an_example(doc: str) -> None:
    views = re.split(r"^### +(\w+)\s*$", _sections(doc)["Views"], flags=re.M)
    for name, body in zip(views[1::2], views[2::2], strict=True):
        assert re.search(rf"^```sql\n[^`]*\b{name}\b", body, re.M), f"### {name} has no example query on it"


def test_the_view_examples_run_on_the_previous_release(doc: str, url: str) -> None:
    released(url)
    upgrade(url)
    engine = make_engine(url)
    examples = view_examples(doc)
    assert len(examples) >= 4
    try:
        for sql in examples:
            statement = sql.strip().rstrip(";")
            assert ";" not in statement, f"one statement per example:\n{sql}"
            with engine.connect() as conn:
                rows = conn.exec_driver_sql(statement).all()
            assert rows, f"the example returns nothing on the release database:\n{sql}"
    finally:
        engine.dispose()
