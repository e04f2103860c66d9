"""What every ``ionflow`` command shares: the typer apps, the error console, loading and checking
a campaign file, Prefect's environment, Ctrl-C, and small rich renderings."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Active learning of electrostatic ML potentials.")
err = Console(stderr=True, highlight=False, soft_wrap=True)
db_app = typer.Typer(no_args_is_help=True, help="The provenance database: schema migrations.")
app.add_typer(db_app, name="db")


def prefect_environment(campaign_dir: Path | None = None) -> None:
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


def exit_interrupted() -> None:
    err.print(f"\n[yellow]{INTERRUPTED}[/]", soft_wrap=True)
    os._exit(130)


def on_sigint(signum, frame) -> None:
    if getattr(on_sigint, "seen", False):
        exit_interrupted()  # a second Ctrl-C: leave now
    on_sigint.seen = True
    watchdog = threading.Timer(INTERRUPT_GRACE_S, exit_interrupted)
    watchdog.daemon = True
    watchdog.start()
    raise KeyboardInterrupt


def log_to(folder: Path) -> None:
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
    from ionflow.db.session import shown_url as shown

    return shown(url)


def load_campaign(config: Path):
    from ionflow.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def check_reference(cfg, path: Path) -> None:
    """Refuse, before any work, a system the reference adapter cannot label (a periodic cell for
    PySCF, a charge the ASE calculator cannot be told, a code that is not installed), and a
    foundation model that cannot start it (:func:`read_foundation_options`)."""
    from ionflow.dft_adapters import SettingError, get_adapter

    adapter = get_adapter(cfg.reference.adapter, cfg.reference.settings)
    try:
        adapter.check([cfg.system.atoms()])
    except SettingError as exc:
        fail(f"{path}: reference.settings.{exc.setting}: {exc} (adapter {cfg.reference.adapter!r})")
    except ValueError as exc:
        fail(f"{path}: reference adapter {cfg.reference.adapter!r}: {exc}")
    from ionflow.dft_adapters.aiida import check_dispatch

    try:
        check_dispatch(cfg.reference.dispatch)
    except ValueError as exc:
        fail(f"{path}: {exc}")
    read_foundation_options(cfg.model, cfg.training, [cfg.system.atoms(), *cfg.test_structures()[0]], "the campaign")


def read_foundation_options(model, training, frames: list, what: str) -> tuple:
    """The foundation model (None without ``model.foundation``) and replay frames of a model or
    campaign config, read before any work: exit 2 naming the problem when the file is refused
    (sha256 pin, not a MACE model, an element of ``frames`` it lacks). Says on stderr that the
    file is unpickled."""
    if model.foundation is None:
        return None, []
    from ionflow.platform.finetune import check_elements, read_replay
    from ionflow.platform.model.foundation import UNPICKLING_NOTE, read_foundation

    err.print(f"note: reading foundation model {model.foundation}: {UNPICKLING_NOTE}")
    try:
        foundation = read_foundation(model.foundation, model.foundation_sha256)
        check_elements(foundation, frames, what)
        replay = [] if training.replay_file is None else read_replay(training.replay_file, foundation.z_table)
    except ValueError as exc:
        fail(str(exc))
    if training.frozen_layers > int(foundation.config["num_interactions"]):
        fail(
            f"training.frozen_layers is {training.frozen_layers} but the foundation has "
            f"{foundation.config['num_interactions']} message-passing layers"
        )
    err.print(f"foundation sha256 {foundation.sha256}")
    return foundation, replay


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)


def read_labelled(data: Path) -> list:
    """Every frame of a labelled file, labels as ``REF_*`` keys (a calculator's plain energy/forces
    too, as other tools write them); exit 2 naming the problem when a frame cannot be used."""
    if not data.is_file():
        fail(f"{data}: no such data file")
    from ionflow.platform.dataset import dataset_problem
    from ionflow.platform.structures import read_structures, with_reference_labels

    try:
        frames = [with_reference_labels(a) for a in read_structures(data)]
    except Exception as exc:  # ASE raises many types for unreadable files
        fail(f"{data}: cannot read structures: {exc}")
    problem = dataset_problem(frames)
    if problem:
        fail(f"{data}: {problem}")
    return frames


def progress_bar(description: str):
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


def metrics_table(metrics: dict, title: str = "validation errors"):
    """Errors (of :func:`ionflow.platform.evaluation.evaluate`) as a small rich table."""
    from rich.table import Table

    if not metrics.get("n"):
        table = Table(title="validation: no frames held out")
        table.add_column("")
        return table
    table = Table(title=f"{title} ({metrics['n']} frames)")
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
