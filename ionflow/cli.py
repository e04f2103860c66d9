"""The ``ionflow`` command: parse, check, call, print."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Active learning of electrostatic ML potentials.")
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _prefect_environment(campaign_dir: Path | None = None) -> None:
    """Prefect settings that must be in place before it is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # Prefect's own console lines would tear through the progress bars; its logs still
    # reach the Prefect server (UI) and the campaign's log file.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")


INTERRUPTED = "interrupted: finished work is in the database; run the same command again to resume"
#: After Ctrl-C, Prefect flushes logs and events to its server, which the same Ctrl-C may have
#: stopped; its retries would hold the terminal for minutes. Every result is already committed,
#: so after this grace period the process ends anyway.
INTERRUPT_GRACE_S = 10.0


def _exit_interrupted() -> None:
    err.print(f"\n[yellow]{INTERRUPTED}[/]", soft_wrap=True)
    os._exit(130)


def _on_sigint(signum, frame) -> None:
    if getattr(_on_sigint, "seen", False):
        _exit_interrupted()  # a second Ctrl-C: leave now
    _on_sigint.seen = True
    watchdog = threading.Timer(INTERRUPT_GRACE_S, _exit_interrupted)
    watchdog.daemon = True
    watchdog.start()
    raise KeyboardInterrupt


def _log_to(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / "campaign.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ionflow", "prefect"):  # prefect.flow_runs / prefect.task_runs propagate to "prefect"
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)


def _load(config: Path):
    from ionflow.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _check_resumable(cfg) -> None:
    """Refuse, before any work, a file whose science differs from the campaign it would resume."""
    from sqlalchemy import inspect

    from ionflow.db import campaign_by_name, make_engine, session_factory, session_scope

    db_file = cfg.campaign_dir / "ionflow.db"
    if cfg.database_url is None and not db_file.exists():
        return
    engine = make_engine(cfg.db_url)
    if "campaign" not in inspect(engine).get_table_names():
        return
    with session_scope(session_factory(engine)) as session:
        campaign = campaign_by_name(session, cfg.name)
        if campaign is not None and campaign.config_hash != cfg.science_hash():
            err.print(
                f"[red]error:[/] campaign {cfg.name!r} in {cfg.db_url} was started with different settings; "
                "resume it with its original file or choose another name"
            )
            raise typer.Exit(2)


@app.command()
def validate(config: Path = typer.Argument(..., help="Campaign file (YAML).")) -> None:
    """Check a campaign file without running anything."""
    cfg = _load(config)
    err.print(f"[green]ok:[/] {config} is a valid campaign ({cfg.name}, {len(cfg.system.atoms())} atoms, "
              f"charge {cfg.system.charge}, multiplicity {cfg.system.multiplicity})")


@app.command()
def run(config: Path = typer.Argument(..., help="Campaign file (YAML).")) -> None:
    """Run a campaign, or resume it if it was interrupted."""
    cfg = _load(config)
    _check_resumable(cfg)
    _prefect_environment()
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.report import console

    _log_to(cfg.campaign_dir)  # after importing prefect, whose logging setup replaces handlers

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, _on_sigint)
    start = time.perf_counter()
    try:
        summary = campaign_flow(str(config))
    except KeyboardInterrupt:
        _exit_interrupted()
    console.print(f"\n[bold green]done[/] in {time.perf_counter() - start:.0f} s: {summary['stop_reason']}")
    console.print(f"  model     {summary['model']}")
    console.print(f"  dataset   {summary['dataset']}  (REF_energy / REF_forces, eV and eV/Å)")
    console.print(f"  test set  {summary['test_set']}")
    console.print(f"  database  {summary['database_url']}")
    console.print(f"  folder    {summary['folder']}")


@app.command()
def status(
    target: Path = typer.Argument(..., help="Campaign file, or a campaign folder holding ionflow.db."),
    name: str | None = typer.Option(None, help="Campaign name (default: the file's, or the only one)."),
) -> None:
    """Print a campaign's iterations from its database."""
    from ionflow.db import Campaign, iteration_table, make_engine, session_factory, session_scope
    from ionflow.flows.report import console
    from ionflow.flows.report import iteration_table as render

    if target.is_dir():
        db_file = target / "ionflow.db"
        if not db_file.exists():
            err.print(f"[red]error:[/] {target} holds no ionflow.db")
            raise typer.Exit(2)
        url = f"sqlite:///{db_file.resolve()}"
    else:
        cfg = _load(target)
        url, name = cfg.db_url, name or cfg.name
        if cfg.database_url is None and not (cfg.campaign_dir / "ionflow.db").exists():
            err.print(f"[red]error:[/] campaign {cfg.name} has not run yet (no {cfg.campaign_dir / 'ionflow.db'})")
            raise typer.Exit(2)
    from sqlalchemy import select

    with session_scope(session_factory(make_engine(url))) as session:
        query = select(Campaign) if name is None else select(Campaign).where(Campaign.name == name)
        campaigns = session.scalars(query).all()
        if len(campaigns) != 1:
            err.print(f"[red]error:[/] found {len(campaigns)} campaigns{f' named {name}' if name else ''}; use --name")
            raise typer.Exit(2)
        campaign = campaigns[0]
        rows = iteration_table(session, campaign.id)
        console.print(render(rows, f"{campaign.name} ({campaign.status}) — {campaign.workdir}"))


@app.command()
def train(
    data: Path = typer.Argument(..., help="Labelled structures (extxyz): REF_energy/REF_forces or plain energy/forces."),
    output: Path = typer.Option(..., "--output", "-o", help="Model file to write (.pt)."),
    config: Path | None = typer.Option(None, "--config", help="YAML with 'model:' and 'training:' sections."),
    electrostatics: str | None = typer.Option(None, help="Long-range head: none, latent, equilibrated, polarisable."),
    uncertainty: str | None = typer.Option(None, help="committee (independent members) or shallow (one backbone, K heads)."),
    ensemble_size: int | None = typer.Option(None, help="Members of the committee, or heads of the shallow ensemble."),
    epochs: int | None = typer.Option(None, help="Training epochs."),
    valid_fraction: float | None = typer.Option(None, help="Share of frames held out for validation."),
    seed: int = typer.Option(0, help="Seed of the split and the initial weights."),
) -> None:
    """Train a model (committee or shallow ensemble) on a labelled dataset, outside any campaign.

    Each frame's total charge and multiplicity come from its info (charge, multiplicity; defaults 0 and 1).
    REF_charges and REF_dipole labels are fitted by models with electrostatics.
    """
    from ionflow.config import ConfigError, load_train_config

    overrides = {
        "model": {k: v for k, v in {"electrostatics": electrostatics, "uncertainty": uncertainty, "ensemble_size": ensemble_size}.items() if v is not None},
        "training": {k: v for k, v in {"epochs": epochs, "valid_fraction": valid_fraction}.items() if v is not None},
    }
    try:
        model_cfg, training_cfg = load_train_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    if not data.is_file():
        _fail(f"{data}: no such data file")

    from ionflow.platform.structures import read_structures, with_reference_labels

    try:
        frames = [with_reference_labels(a) for a in read_structures(data)]
    except Exception as exc:  # ASE raises many types for unreadable files
        _fail(f"{data}: cannot read structures: {exc}")

    from ionflow.platform.training import dataset_problem, fit_dataset

    problem = dataset_problem(frames)
    if problem:
        _fail(f"{data}: {problem}")

    from rich.console import Console

    from ionflow.platform.model import save_model

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Console(highlight=False)
    labelled = any("REF_dipole" in a.info or "REF_charges" in a.arrays for a in frames)
    if labelled and model_cfg.electrostatics == "none":
        err.print("note: the data has REF_dipole/REF_charges labels; a model with --electrostatics fits them")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(
            f"training {model_cfg.ensemble_size} {'heads' if model_cfg.uncertainty == 'shallow' else 'members'} "
            f"({model_cfg.electrostatics}) on {len(frames)} frames",
            total=training_cfg.epochs,
        )
        committee, report, metrics = fit_dataset(
            frames, model_cfg, training_cfg, seed=seed, progress=lambda done, total: bar.update(task, completed=done)
        )
    save_model(committee, output)
    out.print(_metrics_table(metrics))
    calibration = committee.spec.calibration
    out.print(f"uncertainty calibration (fitted on the validation frames): energy spread × {calibration['energy']:.3g}, "
              f"force spread × {calibration['forces']:.3g}")
    out.print(f"[bold green]saved[/] {output}  (best epoch {report.best_epoch + 1}/{report.epochs}, "
              f"{report.wall_time_s:.1f} s)")


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)


def _metrics_table(metrics: dict):
    """Validation errors as a small rich table."""
    from rich.table import Table

    if not metrics.get("n"):
        table = Table(title="validation: no frames held out")
        table.add_column("")
        return table
    table = Table(title=f"validation errors ({metrics['n']} frames)")
    table.add_column("quantity")
    table.add_column("RMSE", justify="right")
    table.add_column("MAE", justify="right")
    table.add_row("energy (meV/atom)", f"{1000 * metrics['energy_rmse']:.2f}", f"{1000 * metrics['energy_mae']:.2f}")
    table.add_row("forces (eV/Å)", f"{metrics['forces_rmse']:.4f}", f"{metrics['forces_mae']:.4f}")
    if "charges_rmse" in metrics:
        table.add_row("charges (e)", f"{metrics['charges_rmse']:.4f}", f"{metrics['charges_mae']:.4f}")
    if "dipole_rmse" in metrics:
        table.add_row("dipole (e·Å)", f"{metrics['dipole_rmse']:.4f}", f"{metrics['dipole_mae']:.4f}")
    return table


def main() -> None:
    app()


if __name__ == "__main__":
    main()
