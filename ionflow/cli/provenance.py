"""Provenance commands, all read-only: ``lineage``, ``export`` (dataset, decisions, calculations,
md-runs, models) and ``db shell``. ``status`` (in :mod:`~ionflow.cli.campaign`) shares their way
of finding a campaign: :func:`open_target`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ionflow.cli.common import app, db_app, fail, load_campaign, shown_url

export_app = typer.Typer(
    no_args_is_help=True,
    help="Write a campaign's provenance to files: a model's dataset (extxyz), or its decisions, "
    "calculations, MD runs and models as CSV or Parquet (units in the column names).",
)
app.add_typer(export_app, name="export")

TARGET_HELP = "Campaign file, campaign folder (holding ionflow.db), or database URL."
CAMPAIGN_HELP = "Campaign name (needed when the database holds several)."


@dataclass
class Target:
    """Where a campaign's database is, and the folder its relative paths resolve against (None:
    the folder the database recorded)."""

    url: str
    campaign: str | None
    folder: Path | None


def resolve_target(target: str, campaign: str | None) -> Target:
    """A campaign file, a campaign folder or a database URL; exit 2 naming what is wrong."""
    from ionflow.db import sqlite_url

    if "://" in target:
        return Target(target, campaign, None)
    path = Path(target)
    if path.is_dir():
        if not (path / "ionflow.db").is_file():
            fail(f"{path} holds no ionflow.db (give a campaign folder, a campaign file or a database URL)")
        return Target(sqlite_url(path / "ionflow.db"), campaign, path.resolve())
    if not path.exists():
        fail(f"{target}: no such campaign file, folder or database URL")
    if path.suffix == ".db":
        return Target(sqlite_url(path), campaign, path.resolve().parent)
    cfg = load_campaign(path)
    if cfg.default_database and not (cfg.campaign_dir / "ionflow.db").exists():
        fail(f"campaign {cfg.name} has not run yet (no {cfg.campaign_dir / 'ionflow.db'})")
    return Target(cfg.db_url, campaign or cfg.name, cfg.campaign_dir)


@contextmanager
def open_target(target: Target) -> Iterator[tuple[Any, Any]]:
    """(read-only session, campaign row) of a target; exit 2 when the database or campaign is not there."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from ionflow.db import session_factory
    from ionflow.db.queries import campaigns_named
    from ionflow.db.session import read_only_engine

    try:
        engine = read_only_engine(target.url)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    from ionflow.db.session import schema_problem

    try:
        problem = schema_problem(engine)
    except (OperationalError, ProgrammingError) as exc:
        problem = f"cannot read it: {str(exc).splitlines()[0]}"
    if problem is not None:
        engine.dispose()
        fail(f"{shown_url(target.url)}: {problem}")
    session = session_factory(engine)()
    try:
        try:
            campaigns = campaigns_named(session, target.campaign)
        except (OperationalError, ProgrammingError) as exc:
            fail(f"cannot read an ionflow database at {shown_url(target.url)}: {str(exc).splitlines()[0]}")
        if len(campaigns) != 1:
            if target.campaign is not None:
                names = [c.name for c in campaigns_named(session)]
                fail(
                    f"no campaign {target.campaign!r} in {shown_url(target.url)} (campaigns: {', '.join(names) or 'none'})"
                )
            names = ", ".join(c.name for c in campaigns) or "none"
            fail(f"{shown_url(target.url)} holds {len(campaigns)} campaigns ({names}); choose one with --campaign")
        yield session, campaigns[0]
    finally:
        session.rollback()
        session.close()
        engine.dispose()


def folder_of(target: Target, campaign: Any) -> Path:
    """The folder that the campaign's relative paths resolve against (the one given, if it is the
    campaign's; else the recorded one)."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import object_session

    from ionflow.db.models import Campaign
    from ionflow.db.provenance import campaign_folder

    if target.folder is None:
        return Path(campaign.workdir)
    only = object_session(campaign).scalar(select(func.count(Campaign.id))) == 1
    return campaign_folder(target.folder, campaign.workdir, only)


def parse_version(text: str | None) -> int | None:
    """``v3`` or ``3`` -> 3; None -> None (the newest)."""
    if text is None:
        return None
    digits = text[1:] if text[:1] in "vV" else text
    if not digits.isdigit():
        fail(f"--model {text!r}: give a model version such as v3")
    return int(digits)


def model_or_fail(session: Any, campaign: Any, version: int | None) -> Any:
    """Model ``version`` (None: the newest) of a campaign; exit 2 naming the versions there are."""
    from ionflow.db.provenance import find_model

    try:
        return find_model(session, campaign.id, version)
    except LookupError as exc:
        fail(f"campaign {campaign.name}: {exc}")


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# --- lineage -----------------------------------------------------------------------------------


@app.command()
def lineage(
    target: str = typer.Argument(..., help=TARGET_HELP + " Or a model file (.pt): what it carries, no database."),
    model: str | None = typer.Option(None, "--model", help="Model version, e.g. v3 (default: the newest)."),
    campaign: str | None = typer.Option(None, help=CAMPAIGN_HELP),
    as_json: bool = typer.Option(False, "--json", help="Everything as one JSON object."),
    as_csv: bool = typer.Option(False, "--csv", help="The training members as CSV."),
) -> None:
    """Where a model came from: parents, hyper-parameters, metrics, checkpoint (sha256 verified) and
    every label it was trained on, with the MD run and step and the decision that chose it."""
    if as_json and as_csv:
        fail("--json and --csv: choose one")
    path = Path(target)
    if path.suffix == ".pt" and "://" not in target:
        return _file_lineage(path, as_json)
    version = parse_version(model)
    resolved = resolve_target(target, campaign)
    from ionflow.db.objects import sha256_file
    from ionflow.db.provenance import lineage as model_lineage

    with open_target(resolved) as (session, row):
        found = model_or_fail(session, row, version)
        info = model_lineage(session, found)
        folder = folder_of(resolved, row)
    checkpoint = folder / info["checkpoint_path"]
    info["checkpoint_file"] = str(checkpoint)
    if not checkpoint.is_file():
        info["checkpoint_check"] = "missing"
    else:
        info["checkpoint_check"] = "verified" if sha256_file(checkpoint) == info["checkpoint_sha256"] else "MISMATCH"
        info["file_provenance"] = _provenance_of(checkpoint)
    if as_json:
        typer.echo(json.dumps(info, default=json_default, indent=1))
    elif as_csv:
        write_csv(info["members"], sys.stdout)
    else:
        _print_lineage(info)
    if info["checkpoint_check"] == "MISMATCH":
        raise typer.Exit(4)


def _provenance_of(path: Path) -> dict[str, Any]:
    from ionflow.platform.model import read_provenance

    try:
        return read_provenance(path)
    except ValueError as exc:
        return {"error": str(exc)}


def _file_lineage(path: Path, as_json: bool) -> None:
    from ionflow.db.objects import sha256_file

    if not path.is_file():
        fail(f"{path}: no such model file")
    from ionflow.platform.model import read_provenance

    try:
        recorded = read_provenance(path)
    except ValueError as exc:
        fail(str(exc))
    info = {"file": str(path), "sha256": sha256_file(path), **recorded}
    if as_json:
        typer.echo(json.dumps(info, default=json_default, indent=1))
        return
    out = Console(highlight=False, soft_wrap=True)
    if not recorded:
        out.print(f"{path}: written by ionflow before model files carried their provenance")
    for key, value in info.items():
        out.print(f"{key:<22} {value}")


def _print_lineage(info: dict[str, Any]) -> None:
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"[bold]model v{info['version']}[/] of campaign [cyan]{info['campaign']}[/] ({info['kind']})")
    parents = " <- ".join(f"v{p['version']}" for p in info["parents"]) or "none (the first model)"
    out.print(f"  trained in iteration {info['iteration_index']}, {info['created_at']}; parents: {parents}")
    check = {"verified": "[green]verified[/]", "missing": "[yellow]missing[/]"}.get(
        info["checkpoint_check"], "[red]MISMATCH[/]"
    )
    out.print(f"  checkpoint {info['checkpoint_file']}")
    out.print(f"  sha256     {info['checkpoint_sha256']} ({check})")
    out.print(f"  training set sha256 {info['training_set_sha256']}", end="")
    in_file = (info.get("file_provenance") or {}).get("training_set_sha256")
    out.print(
        ""
        if in_file is None
        else (
            " (the file says the same)"
            if in_file == info["training_set_sha256"]
            else " [red](the file says otherwise)[/]"
        )
    )
    hyper = info["hyperparameters"]
    model, training = hyper.get("model", {}), hyper.get("training", {})
    shown = ", ".join(
        f"{k}={model[k]}"
        for k in ("ensemble_size", "hidden_irreps", "num_interactions", "r_max", "electrostatics")
        if k in model
    )
    out.print(f"  model      {shown}")
    foundation = (hyper.get("spec") or {}).get("foundation")
    if foundation:
        out.print(f"  foundation {foundation['path']} (sha256 {foundation['sha256']})")
    shown = ", ".join(
        f"{k}={training[k]}" for k in ("epochs", "finetune_epochs", "lr", "batch_size", "from_scratch") if k in training
    )
    out.print(f"  training   {shown}")
    m = info["metrics"]
    errors = Table(
        title="RMSE (E meV/atom, F eV/Å, charges e, dipole e·Å; every metric: --json)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
    )
    for header in ("set", "n", "E", "F", "charges", "dipole"):
        errors.add_column(header, justify="right", no_wrap=True)
    for prefix, label in (("valid", "validation"), ("test", "test then"), ("current_test", "test now")):
        if m.get(f"{prefix}_n_structures") is None:
            continue
        energy = m.get(f"{prefix}_energy_rmse_eV_per_atom")
        errors.add_row(
            label,
            str(m.get(f"{prefix}_n_structures")),
            "-" if energy is None else f"{1000 * energy:.2f}",
            *(
                "-" if m.get(f"{prefix}_{key}") is None else f"{m[f'{prefix}_{key}']:.4f}"
                for key in ("forces_rmse_eV_per_A", "charges_rmse_e", "dipole_rmse_e_A")
            ),
        )
    out.print(errors)
    counts = Table(
        title=f"trained on {len(info['members'])} labels",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
    )
    for header in ("split", "origin", "chosen because", "labels"):
        counts.add_column(header, no_wrap=True)
    for c in info["counts"]:
        counts.add_row(c["split"], c["origin"], c["chosen_because"], str(c["n"]))
    out.print(counts)
    members = Table(
        title="labels (code, run folder, CPU time: --csv or --json)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
        pad_edge=False,
    )
    columns = (
        "calculation_id",
        "structure_hash",
        "split",
        "origin",
        "iteration_index",
        "md_run_id",
        "md_step",
        "chosen_because",
        "score_eV_per_A",
    )
    headers = ["calc", "structure", "split", "origin", "it", "MD run", "step", "chosen", "σF eV/Å"]
    remote = any(m.get("aiida_uuid") for m in info["members"])
    if remote:  # computed through AiiDA: the CalcJob node (`verdi process show UUID`)
        columns += ("aiida_uuid",)
        headers.append("AiiDA node")
    for header in headers:
        members.add_column(header, no_wrap=True)
    for m in info["members"]:
        values = [m.get(c) for c in columns]
        values[1] = values[1][:8]
        values[8] = None if values[8] is None else f"{values[8]:.3f}"
        members.add_row(*("-" if v is None else str(v) for v in values))
    out.print(members)
    for run in info["prefect_runs"]:
        out.print(
            f"  prefect {run['name']} {run['run_id']} {run['state']}"
            + (" (temporary server)" if run["temporary_server"] else f" at {run['api_url']}")
        )


# --- export ------------------------------------------------------------------------------------


def write_csv(rows: list[dict[str, Any]], stream: Any) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json_default(v) if isinstance(v, (datetime, dict, list)) else v for k, v in row.items()})


def write_table(rows: list[dict[str, Any]], output: Path | None, fmt: str | None) -> None:
    """CSV (to ``output`` or stdout) or Parquet (to ``output``), by ``fmt`` or the file's suffix."""
    fmt = fmt or ("parquet" if output is not None and output.suffix == ".parquet" else "csv")
    if fmt not in ("csv", "parquet"):
        fail(f"--format {fmt!r}: csv or parquet")
    if fmt == "parquet":
        if output is None:
            fail("Parquet is binary: give --output FILE.parquet")
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = pa.Table.from_pylist([{c: _arrow_value(row.get(c)) for c in columns} for row in rows])
        pq.write_table(table, output)
    elif output is None:
        write_csv(rows, sys.stdout)
    else:
        with open(output, "w", newline="", encoding="utf-8") as f:
            write_csv(rows, f)
    if output is not None:
        Console(stderr=True, highlight=False).print(f"[green]wrote[/] {output} ({len(rows)} rows)")


def _arrow_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _table_command(name: str, doc: str):
    def command(
        target: str = typer.Argument(..., help=TARGET_HELP),
        campaign: str | None = typer.Option(None, help=CAMPAIGN_HELP),
        output: Path | None = typer.Option(None, "--output", "-o", help="File to write (default: CSV to stdout)."),
        fmt: str | None = typer.Option(None, "--format", help="csv or parquet (default: by the file's suffix)."),
        iteration: int | None = typer.Option(None, help="Only this iteration (decisions only)."),
    ) -> None:
        from ionflow.db.provenance import TABLES

        if iteration is not None and name != "decisions":
            fail("--iteration applies to decisions only")
        resolved = resolve_target(target, campaign)
        with open_target(resolved) as (session, row):
            rows = TABLES[name](session, row.id, iteration) if name == "decisions" else TABLES[name](session, row.id)
        write_table(rows, output, fmt)

    command.__doc__ = doc
    export_app.command(name)(command)


_table_command(
    "decisions",
    "Every selection decision: iteration, frame, MD run and step, score, threshold, chosen, reason code, rank.",
)
_table_command(
    "calculations",
    "The campaign's reference calculations: code, version, settings hash, status, energy, wall and CPU time, run folder.",
)
_table_command(
    "md-runs",
    "The campaign's MD walker runs: model, start and where it came from, temperature, steps, why they stopped.",
)
_table_command("models", "The campaign's models: version, parent, labels by split, checkpoint, every metric.")


@export_app.command("dataset")
def export_dataset(
    target: str = typer.Argument(..., help=TARGET_HELP),
    model: str | None = typer.Option(None, "--model", help="Model version, e.g. v1 (default: the newest)."),
    split: str | None = typer.Option(None, help="train, valid or test (default: train and valid)."),
    campaign: str | None = typer.Option(None, help=CAMPAIGN_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="extxyz file to write."),
) -> None:
    """A model's labelled structures as extxyz (REF_energy eV, REF_forces eV/Å): its training and
    validation sets, or the test set it was evaluated on when trained; each frame's info holds the
    calculation id, structure hash, split, origin, iteration, MD run and step."""
    if split not in (None, "train", "valid", "test"):
        fail(f"--split {split!r}: train, valid or test")
    version = parse_version(model)
    resolved = resolve_target(target, campaign)
    from ionflow.db.objects import ObjectStore
    from ionflow.db.provenance import test_members, training_members
    from ionflow.db.records import labelled_atoms
    from ionflow.platform.structures import write_extxyz

    with open_target(resolved) as (session, row):
        found = model_or_fail(session, row, version)
        members = test_members(session, found) if split == "test" else training_members(session, found, split)
        version = found.version
        store = ObjectStore(folder_of(resolved, row))
        frames = []
        for calculation, structure, info in members:
            try:
                atoms = labelled_atoms(store, structure, calculation)
            except FileNotFoundError as exc:
                fail(f"calculation {calculation.id}: {exc} (give the campaign folder as TARGET if it moved)")
            atoms.info.update({k: v for k, v in info.items() if v is not None}, model_version=found.version)
            frames.append(atoms)
    if not frames:
        fail(f"model v{version} has no {split or 'training'} structures")
    write_extxyz(output, frames)
    Console(stderr=True, highlight=False).print(
        f"[green]wrote[/] {output}: {len(frames)} structures of model v{version} ({split or 'train and valid'})"
    )


# --- db shell ----------------------------------------------------------------------------------


@db_app.command("shell")
def db_shell(
    target: str = typer.Argument(..., help=TARGET_HELP),
) -> None:
    """Open the campaign's database read-only in sqlite3 or psql (views: ionflow_training_set,
    ionflow_decisions, ionflow_learning_curve, ionflow_reference_cost; see docs/schema.md)."""
    from sqlalchemy.engine import make_url

    resolved = resolve_target(target, None)
    url = make_url(resolved.url)
    if url.get_backend_name() == "sqlite":
        program = shutil.which("sqlite3")
        if program is None:
            fail("sqlite3 is not installed (Debian: apt-get install sqlite3)")
        os.execv(program, [program, "-readonly", "-header", str(Path(url.database).resolve())])
    program = shutil.which("psql")
    if program is None:
        fail("psql is not installed (Debian: apt-get install postgresql-client)")
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)  # never on the command line
    env["PGOPTIONS"] = " ".join(filter(None, [url.query.get("options"), "-c default_transaction_read_only=on"]))
    plain = url.set(drivername="postgresql", password=None, query={})
    os.execve(program, [program, plain.render_as_string(hide_password=False)], env)


# --- ui ----------------------------------------------------------------------------------------


@app.command()
def ui(
    target: str = typer.Argument(".", help=TARGET_HELP + " (default: the campaign folder here)"),
    host: str = typer.Option("127.0.0.1", help="Address to serve on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8765, min=1, max=65535, help="Port to serve on."),
) -> None:
    """Serve the campaign dashboard (read-only): learning curves, calibration, selection, failures,
    models with parity plots, structures in 3D; every campaign of the database."""
    resolved = resolve_target(target, None)
    import uvicorn

    from ionflow.ui.app import create_app

    try:
        app_ = create_app(resolved.url, resolved.folder)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    Console(stderr=True, highlight=False).print(
        f"ionflow dashboard on http://{host}:{port}/ ({shown_url(resolved.url)}); Ctrl-C stops it"
    )
    uvicorn.run(app_, host=host, port=port, log_level="warning")
