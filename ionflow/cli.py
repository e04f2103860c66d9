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


def shown_url(url: str) -> str:
    """A database URL fit to print: any password replaced by ***."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _load(config: Path):
    from ionflow.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _check_reference(cfg, path: Path) -> None:
    """Refuse, before any work, a system the reference adapter cannot label (a periodic cell for
    PySCF, a charge the ASE calculator cannot be told, a code that is not installed)."""
    from ionflow.dft_adapters import get_adapter

    adapter = get_adapter(cfg.reference.adapter, cfg.reference.settings)
    try:
        adapter.check([cfg.system.atoms()])
    except ValueError as exc:
        _fail(f"{path}: reference adapter {cfg.reference.adapter!r}: {exc}")


def _check_resumable(cfg) -> None:
    """Refuse, before any work, a file whose science differs from the campaign it would resume."""
    from sqlalchemy import inspect

    from ionflow.db import campaign_by_name, make_engine, session_factory, session_scope

    db_file = cfg.campaign_dir / "ionflow.db"
    if cfg.default_database and not db_file.exists():
        return
    engine = make_engine(cfg.db_url)
    if "campaign" not in inspect(engine).get_table_names():
        return
    with session_scope(session_factory(engine)) as session:
        campaign = campaign_by_name(session, cfg.name)
        if campaign is not None and campaign.config_hash != cfg.science_hash():
            err.print(
                f"[red]error:[/] campaign {cfg.name!r} in {shown_url(cfg.db_url)} was started with different settings; "
                "resume it with its original file or choose another name"
            )
            raise typer.Exit(2)


@app.command()
def validate(config: Path = typer.Argument(..., help="Campaign file (YAML).")) -> None:
    """Check a campaign file without running anything."""
    cfg = _load(config)
    _check_reference(cfg, config)
    err.print(
        f"[green]ok:[/] {config} is a valid campaign ({cfg.name}, {len(cfg.system.atoms())} atoms, "
        f"charge {cfg.system.charge}, multiplicity {cfg.system.multiplicity})"
    )


@app.command()
def run(config: Path = typer.Argument(..., help="Campaign file (YAML).")) -> None:
    """Run a campaign, or resume it if it was interrupted."""
    cfg = _load(config)
    _check_reference(cfg, config)
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
    stopped = summary["status"] == "stopped"
    head = "[bold yellow]stopped[/]" if stopped else "[bold green]done[/]"
    console.print(f"\n{head} in {time.perf_counter() - start:.0f} s: {summary['stop_reason']}")
    counts = summary["calculations"]
    if counts:
        outcome = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        console.print(f"  reference {outcome}" + (" (the rows' error column says why)" if set(counts) - {"ok"} else ""))
    console.print(f"  model     {summary['model']}")
    console.print(f"  dataset   {summary['dataset']}  (REF_energy / REF_forces, eV and eV/Å)")
    console.print(f"  test set  {summary['test_set']}")
    console.print(f"  database  {shown_url(summary['database_url'])}")
    console.print(f"  folder    {summary['folder']}")
    if stopped:
        raise typer.Exit(3)


@app.command()
def status(
    target: Path = typer.Argument(..., help="Campaign file, or a campaign folder holding ionflow.db."),
    name: str | None = typer.Option(None, help="Campaign name (default: the file's, or the only one)."),
) -> None:
    """Print a campaign's iterations from its database."""
    from ionflow.db import (
        Campaign,
        iteration_table,
        make_engine,
        session_factory,
        session_scope,
    )
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
        if cfg.default_database and not (cfg.campaign_dir / "ionflow.db").exists():
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
    data: Path = typer.Argument(
        ..., help="Labelled structures (extxyz): REF_energy/REF_forces or plain energy/forces."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Model file to write (.pt)."),
    config: Path | None = typer.Option(None, "--config", help="YAML with 'model:' and 'training:' sections."),
    electrostatics: str | None = typer.Option(None, help="Long-range head: none, latent, equilibrated, polarisable."),
    uncertainty: str | None = typer.Option(
        None, help="committee (independent members) or shallow (one backbone, K heads)."
    ),
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
        "model": {
            k: v
            for k, v in {
                "electrostatics": electrostatics,
                "uncertainty": uncertainty,
                "ensemble_size": ensemble_size,
            }.items()
            if v is not None
        },
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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from ionflow.platform.model import save_model

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
    out.print(
        f"uncertainty calibration (fitted on the validation frames): energy spread × {calibration['energy']:.3g}, "
        f"force spread × {calibration['forces']:.3g}"
    )
    out.print(
        f"[bold green]saved[/] {output}  (best epoch {report.best_epoch + 1}/{report.epochs}, "
        f"{report.wall_time_s:.1f} s)"
    )


def _label_settings(settings_file: Path | None, assignments: list[str]) -> dict:
    """Adapter settings from a YAML mapping (or a campaign file's ``reference.settings``) and
    ``key=value`` options (values read as YAML; ``a.b=v`` sets a nested key)."""
    import yaml

    settings: dict = {}
    if settings_file is not None:
        if not settings_file.is_file():
            _fail(f"{settings_file}: no such settings file")
        try:
            raw = yaml.safe_load(settings_file.read_text()) or {}
        except yaml.YAMLError as exc:
            _fail(f"{settings_file}: not valid YAML: {exc}")
        if not isinstance(raw, dict):
            _fail(f"{settings_file}: expected a mapping of adapter settings")
        if isinstance(raw.get("reference"), dict):  # a campaign file
            raw = raw["reference"].get("settings") or {}
        settings = raw
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--set {item!r}: expected key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        target = settings
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                _fail(f"--set {item!r}: {part} is not a mapping")
        target[leaf] = parsed
    return settings


@app.command()
def label(
    structures: Path = typer.Argument(
        ...,
        help="Structures to label (extxyz or any ASE-readable file); charge and "
        "multiplicity from each frame's info (default 0 and 1).",
    ),
    output: Path = typer.Argument(
        ...,
        help="Labelled structures to write (extxyz): REF_energy (eV), REF_forces (eV/Å) and what else the code gives.",
    ),
    adapter: str = typer.Option(..., "--adapter", "-a", help="Reference adapter: pyscf, tblite or ase."),
    settings_file: Path | None = typer.Option(
        None, "--settings", help="YAML with the adapter's settings (or a campaign file)."
    ),
    assignments: list[str] = typer.Option(
        [], "--set", help="One setting as key=value (repeatable; a.b=v for nested keys)."
    ),
    workers: int = typer.Option(1, min=1, help="Calculations at once."),
    threads: int | None = typer.Option(None, min=1, help="Threads per calculation (default: cores / workers)."),
    timeout: float | None = typer.Option(None, min=0.001, help="Seconds one calculation may take before it is killed."),
    runs: Path | None = typer.Option(None, help="Folder of the run folders (default: OUTPUT's name + '-runs')."),
) -> None:
    """Label structures with a reference code, outside any campaign.

    Every calculation keeps its files in a run folder. Failed, timed-out and unconverged
    structures are listed and written to OUTPUT-failed.extxyz (with the reason in
    label_error); running the same command again reuses every label already made and tries
    the failed ones again. Exit status 3 when any structure has no label.
    """
    from ionflow.dft_adapters import ADAPTER_NAMES, settings_model

    if adapter not in ADAPTER_NAMES:
        _fail(f"unknown adapter {adapter!r}; known: {', '.join(ADAPTER_NAMES)}")
    settings = _label_settings(settings_file, assignments)
    from pydantic import ValidationError

    from ionflow.config import _first_errors

    try:
        settings = settings_model(adapter).model_validate(settings).model_dump(mode="json")
    except ValidationError as exc:
        _fail(f"settings for adapter {adapter!r}: {_first_errors(exc)}")
    if not structures.is_file():
        _fail(f"{structures}: no such file")
    from ionflow.platform.structures import read_structures

    try:
        frames = read_structures(structures)
    except Exception as exc:  # ASE raises many types for unreadable files
        _fail(f"{structures}: cannot read structures: {exc}")
    if not frames:
        _fail(f"{structures}: no structures")
    from ionflow.dft_adapters.labelfile import label_file

    try:
        outcome = label_file(
            frames,
            output,
            adapter,
            settings,
            runs=runs,
            workers=workers,
            threads=threads,
            timeout_s=timeout,
            progress=_progress_bar(f"labelling {len(frames)} structures with {adapter} on {workers} worker(s)"),
        )
    except ValueError as exc:  # bad structures: refused before any calculation
        _fail(str(exc))
    out = Console(highlight=False)
    out.print(outcome.summary())
    if outcome.failures:
        out.print(outcome.failure_table())
        raise typer.Exit(3)


def _progress_bar(description: str):
    """A progress callback ``(done, total)`` drawing a transient bar on stderr, as a context manager."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextmanager
    def bar():
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task(description, total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)

    return bar()


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


@app.command()
def deploy(
    config: Path = typer.Argument(..., help="Campaign file (YAML)."),
    pool: str = typer.Option("cpu", help="Work pool of the campaign flow and its reference calculations."),
    gpu_pool: str = typer.Option("gpu", help="Work pool of MD and training ('' to run them in the campaign flow)."),
    cron: str | None = typer.Option(None, help="Cron schedule for a recurring campaign, e.g. '0 2 * * *'."),
    label_concurrency: int | None = typer.Option(
        None, min=1, help="Label steps at once on this server (all campaigns)."
    ),
    create_pools: bool = typer.Option(True, help="Create missing work pools (process type)."),
) -> None:
    """Deploy a campaign to the Prefect server at PREFECT_API_URL: work pools, deployments, schedule.

    Then start workers where the work should run, e.g. `prefect worker start --pool cpu` on a CPU
    node and `prefect worker start --pool gpu` on a GPU node, and run it from the UI or with
    `prefect deployment run ionflow-campaign/NAME`.
    """
    cfg = _load(config)
    _check_reference(cfg, config)
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=cron)
        except ValidationError:
            _fail(f"--cron {cron!r} is not a valid cron expression")
    if not os.environ.get("PREFECT_API_URL"):
        _fail(
            "set PREFECT_API_URL to your Prefect server's API (e.g. http://127.0.0.1:4200/api); "
            "a deployment needs a server that outlives this command"
        )
    _prefect_environment()
    from ionflow.flows.deploy import deploy_campaign

    try:
        done = deploy_campaign(
            config,
            work_pool=pool,
            gpu_pool=gpu_pool or None,
            cron=cron,
            label_concurrency=label_concurrency,
            create_pools=create_pools,
        )
    except Exception as exc:  # noqa: BLE001  an unreachable server, a missing pool: say which
        _fail(f"deploying {cfg.name} failed: {exc}")
    out = Console(highlight=False)
    out.print(
        f"[green]deployed[/] ionflow-campaign/{done.campaign} on pool {done.work_pool}"
        + (f", schedule {done.cron}" if done.cron else "")
    )
    if done.gpu_pool:
        out.print(f"[green]deployed[/] ionflow-gpu-step/{done.campaign} (MD, training) on pool {done.gpu_pool}")
    if done.label_concurrency:
        out.print(f"label steps limited to {done.label_concurrency} at once (tag ionflow-label)")
    out.print(f"run it: prefect deployment run 'ionflow-campaign/{done.campaign}'")


db_app = typer.Typer(no_args_is_help=True, help="The provenance database: schema migrations.")
app.add_typer(db_app, name="db")


def _database_url(target: str | None) -> str:
    """A URL given directly, the database of a campaign file, or IONFLOW_DATABASE_URL."""
    from ionflow.config import DATABASE_URL_VARIABLE

    if target is None:
        url = os.environ.get(DATABASE_URL_VARIABLE)
        if not url:
            _fail(f"give a database URL or a campaign file, or set {DATABASE_URL_VARIABLE}")
        return url
    if "://" in target:
        return target
    return _load(Path(target)).db_url


@db_app.command("upgrade")
def db_upgrade(
    target: str | None = typer.Argument(None, help="Database URL or campaign file (default: $IONFLOW_DATABASE_URL)."),
    revision: str = typer.Option("head", help="Alembic revision to migrate to."),
) -> None:
    """Create or migrate the provenance database's schema (SQLite or PostgreSQL); safe to repeat."""
    from sqlalchemy.exc import OperationalError

    from ionflow.db import current_revision, upgrade

    url = _database_url(target)
    try:
        before = current_revision(url)
        upgrade(url, revision)
        after = current_revision(url)
    except OperationalError as exc:
        _fail(f"cannot reach {shown_url(url)}: {str(exc).splitlines()[0]}")
    err.print(
        f"[green]ok:[/] {shown_url(url)} at revision {after}"
        + ("" if before == after else f" (was {before or 'empty'})")
    )


@db_app.command("current")
def db_current(
    target: str | None = typer.Argument(None, help="Database URL or campaign file (default: $IONFLOW_DATABASE_URL)."),
) -> None:
    """Print the schema revision of the provenance database."""
    from ionflow.db import current_revision

    url = _database_url(target)
    typer.echo(current_revision(url) or "empty (run ionflow db upgrade)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
