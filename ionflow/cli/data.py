"""Commands on data outside a campaign: ``train`` a model on a labelled file, ``label`` a file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ionflow.cli.common import (
    app,
    err,
    fail,
    metrics_table,
    progress_bar,
    read_foundation_options,
    read_labelled,
)


@app.command()
def train(
    data: Path = typer.Argument(
        ..., help="Labelled structures (extxyz): REF_energy/REF_forces or plain energy/forces."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Model file to write (.pt)."),
    config: Path | None = typer.Option(None, "--config", help="YAML with 'model:' and 'training:' sections."),
    electrostatics: str | None = typer.Option(
        None, help="Long-range head: none, latent, equilibrated, polarisable, qeq."
    ),
    uncertainty: str | None = typer.Option(
        None, help="committee (independent members) or shallow (one backbone, K heads)."
    ),
    ensemble_size: int | None = typer.Option(None, help="Members of the committee, or heads of the shallow ensemble."),
    epochs: int | None = typer.Option(None, help="Training epochs."),
    valid_fraction: float | None = typer.Option(None, help="Share of frames held out for validation."),
    seed: int = typer.Option(0, help="Seed of the initial weights and of the order of the training frames."),
    foundation: Path | None = typer.Option(
        None,
        help="A mace-torch model file (MACE-MP-0, MACE-OFF, mace_run_train's) to fine-tune: its architecture, "
        "weights and element table become the backbone. It is unpickled (runs code named in it): trusted files only.",
    ),
    foundation_sha256: str | None = typer.Option(None, help="Refuse the foundation file unless it has this sha256."),
    replay: Path | None = typer.Option(
        None, help="Frames of the foundation's own training data (energies, forces) replayed while fine-tuning."
    ),
    frozen_layers: int | None = typer.Option(
        None, help="With --foundation: message-passing layers (and the embeddings) that keep the foundation's weights."
    ),
    processes: str = typer.Option(
        "1",
        help="Training processes on this machine, each on a GPU of its own where there are enough (gloo on the "
        "CPU otherwise): a number, or auto (one per visible GPU). Under torchrun its ranks are the processes.",
    ),
) -> None:
    """Train a model (committee or shallow ensemble) on a labelled dataset, outside any campaign.

    Each frame's total charge and multiplicity come from its info (charge, multiplicity; defaults 0 and 1).
    REF_charges and REF_dipole labels are fitted by models with electrostatics. With --foundation the
    model is fine-tuned from a foundation model; the file's sha256 is recorded in the model's provenance.
    """
    from ionflow.config import ConfigError, load_train_config

    overrides = {
        "model": {
            k: v
            for k, v in {
                "electrostatics": electrostatics,
                "uncertainty": uncertainty,
                "ensemble_size": ensemble_size,
                "foundation": foundation,
                "foundation_sha256": foundation_sha256,
            }.items()
            if v is not None
        },
        "training": {
            k: v
            for k, v in {
                "epochs": epochs,
                "valid_fraction": valid_fraction,
                "replay_file": replay,
                "frozen_layers": frozen_layers,
            }.items()
            if v is not None
        },
    }
    try:
        model_cfg, training_cfg = load_train_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc))
    if processes != "auto" and not (processes.isdigit() and 1 <= int(processes) <= 64):
        fail(f"--processes {processes!r}: a number of processes from 1 to 64, or auto")
    frames = read_labelled(data)
    start, replayed = read_foundation_options(model_cfg, training_cfg, frames, "the data")

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from ionflow.platform.distributed import init_from_env, shutdown
    from ionflow.platform.model import save_model
    from ionflow.platform.training import fit_dataset, training_processes

    # under torchrun (WORLD_SIZE > 1): join the other ranks, each trains on its shard of every batch;
    # alone: nothing to join. Rank 0 alone prints and writes the model (every rank ends with the same).
    main = init_from_env().rank == 0
    out = Console(highlight=False)
    labelled = any("REF_dipole" in a.info or "REF_charges" in a.arrays for a in frames)
    if main and labelled and model_cfg.electrostatics == "none":
        err.print("note: the data has REF_dipole/REF_charges labels; a model with --electrostatics fits them")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=err, transient=True, disable=not main) as bar:
            task = bar.add_task(
                f"training {model_cfg.ensemble_size} {'heads' if model_cfg.uncertainty == 'shallow' else 'members'} "
                f"({model_cfg.electrostatics}) on {len(frames)} frames",
                total=training_cfg.epochs,
            )
            ensemble, report, metrics = fit_dataset(
                frames,
                model_cfg.settings(),
                training_cfg.settings(),
                seed=seed,
                progress=lambda done, total: bar.update(task, completed=done),
                foundation=start,
                replay=replayed,
                processes=training_processes(processes if processes == "auto" else int(processes)),
            )
    finally:
        shutdown()
    if not main:
        return
    from ionflow.db import sha256_file, utcnow

    provenance = {
        "trained_by": "ionflow train",
        "data": str(data.resolve()),
        "data_sha256": sha256_file(data),
        "n_frames": len(frames),
        "seed": seed,
        "created_at": utcnow().isoformat(),
    }
    save_model(ensemble, output, provenance)
    out.print(metrics_table(metrics))
    calibration = ensemble.spec.calibration
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
            fail(f"{settings_file}: no such settings file")
        try:
            raw = yaml.safe_load(settings_file.read_text()) or {}
        except yaml.YAMLError as exc:
            fail(f"{settings_file}: not valid YAML: {exc}")
        if not isinstance(raw, dict):
            fail(f"{settings_file}: expected a mapping of adapter settings")
        if isinstance(raw.get("reference"), dict):  # a campaign file
            raw = raw["reference"].get("settings") or {}
        settings = raw
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--set {item!r}: expected key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        target = settings
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                fail(f"--set {item!r}: {part} is not a mapping")
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
        fail(f"unknown adapter {adapter!r}; known: {', '.join(ADAPTER_NAMES)}")
    settings = _label_settings(settings_file, assignments)
    from pydantic import ValidationError

    from ionflow.config import describe_errors

    try:
        settings = settings_model(adapter).model_validate(settings).model_dump(mode="json")
    except ValidationError as exc:
        fail(f"settings for adapter {adapter!r}: {describe_errors(exc)}")
    if not structures.is_file():
        fail(f"{structures}: no such file")
    from ionflow.platform.structures import read_structures

    try:
        frames = read_structures(structures)
    except Exception as exc:  # ASE raises many types for unreadable files
        fail(f"{structures}: cannot read structures: {exc}")
    if not frames:
        fail(f"{structures}: no structures")
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
            progress=progress_bar(f"labelling {len(frames)} structures with {adapter} on {workers} worker(s)"),
        )
    except ValueError as exc:  # bad structures: refused before any calculation
        fail(str(exc))
    out = Console(highlight=False)
    out.print(outcome.summary())
    if outcome.failures:
        out.print(outcome.failure_table())
        raise typer.Exit(3)


@app.command("label-batch", hidden=True)
def label_batch(
    folder: Path = typer.Argument(Path("."), help="Folder holding batch.json and structures.extxyz."),
) -> None:
    """Label the batch in FOLDER (what a remote job runs: ionflow's AiiDA calculation writes the
    folder); results go to FOLDER/results.jsonl as each calculation ends, then done.json."""
    from ionflow.dft_adapters.batch import BATCH_FILE, run_batch

    if not (folder / BATCH_FILE).is_file():
        fail(f"{folder}: no {BATCH_FILE} (not a batch folder)")
    try:
        counts = run_batch(folder)
    except ValueError as exc:  # bad structures or a batch of another version: refused before any calculation
        fail(str(exc))
    err.print("labelled: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
