"""Campaign commands: ``validate``, ``run``, ``status`` and ``deploy``."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer
from rich.console import Console

from ionflow.cli.common import (
    app,
    check_reference,
    err,
    exit_interrupted,
    fail,
    load_campaign,
    log_to,
    on_sigint,
    prefect_environment,
    shown_url,
)


def _check_resumable(cfg) -> None:
    """Refuse, before any work, a file whose science differs from the campaign it would resume."""
    from ionflow.db import campaign_by_name, make_engine, session_factory, session_scope
    from ionflow.db.session import has_schema

    db_file = cfg.campaign_dir / "ionflow.db"
    if cfg.default_database and not db_file.exists():
        return
    engine = make_engine(cfg.db_url)
    if not has_schema(engine):
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
    cfg = load_campaign(config)
    check_reference(cfg, config)
    err.print(
        f"[green]ok:[/] {config} is a valid campaign ({cfg.name}, {len(cfg.system.atoms())} atoms, "
        f"charge {cfg.system.charge}, multiplicity {cfg.system.multiplicity})"
    )


#: How each test-set origin reads in the run's closing lines.
TEST_ORIGIN_WORDS = {
    "test": "rattled copies of the start",
    "test-md": "held out from MD",
    "test-file": "from test.file",
}


def test_set_note(iterations: list[dict]) -> str:
    """``  (N structures: n held out from MD, ...)`` for the newest evaluated iteration, or ``""``."""
    for row in reversed(iterations):
        m = row.get("metrics") or {}
        if m.get("test_set_n_structures"):
            parts = [
                f"{m[f'test_set_n_{o}']} {words}" for o, words in TEST_ORIGIN_WORDS.items() if m.get(f"test_set_n_{o}")
            ]
            return f"  ({m['test_set_n_structures']} structures{': ' + ', '.join(parts) if parts else ''})"
    return ""


@app.command()
def run(config: Path = typer.Argument(..., help="Campaign file (YAML).")) -> None:
    """Run a campaign, or resume it if it was interrupted."""
    cfg = load_campaign(config)
    check_reference(cfg, config)
    _check_resumable(cfg)
    prefect_environment()
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.report import console

    log_to(cfg.campaign_dir)  # after importing prefect, whose logging setup replaces handlers

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, on_sigint)
    start = time.perf_counter()
    try:
        summary = campaign_flow(str(config))
    except KeyboardInterrupt:
        exit_interrupted()
    stopped = summary["status"] == "stopped"
    head = "[bold yellow]stopped[/]" if stopped else "[bold green]done[/]"
    console.print(f"\n{head} in {time.perf_counter() - start:.0f} s: {summary['stop_reason']}")
    counts = summary["calculations"]
    if counts:
        outcome = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        console.print(f"  reference {outcome}" + (" (the rows' error column says why)" if set(counts) - {"ok"} else ""))
    console.print(f"  model     {summary['model']}")
    console.print(f"  dataset   {summary['dataset']}  (REF_energy / REF_forces, eV and eV/Å)")
    console.print(f"  test set  {summary['test_set']}{test_set_note(summary['iterations'])}")
    console.print(f"  learning  {summary['learning_curve']}  (test errors against labels and reference CPU time)")
    console.print(f"  database  {shown_url(summary['database_url'])}")
    console.print(f"  folder    {summary['folder']}")
    if stopped:
        raise typer.Exit(3)


@app.command()
def status(
    target: str = typer.Argument(..., help="Campaign file, campaign folder (holding ionflow.db), or database URL."),
    name: str | None = typer.Option(
        None, "--campaign", "--name", help="Campaign name (default: the file's, or the only one)."
    ),
    as_json: bool = typer.Option(False, "--json", help="The campaign and its iterations as JSON."),
) -> None:
    """Print a campaign's iterations from its database (opened read-only: nothing is written)."""
    import json

    from ionflow.cli.provenance import json_default, open_target, resolve_target
    from ionflow.db import iteration_table
    from ionflow.flows.report import console
    from ionflow.flows.report import iteration_table as render

    with open_target(resolve_target(target, name)) as (session, campaign):
        rows = iteration_table(session, campaign.id)
        if as_json:
            from sqlalchemy import text

            outcomes = {
                status: int(n)
                for status, n in session.execute(
                    text(
                        "SELECT status, SUM(n_calculations) FROM ionflow_reference_cost "
                        "WHERE campaign_id = :c GROUP BY status ORDER BY status"
                    ),
                    {"c": campaign.id},
                ).all()
            }
            last = next((r for r in reversed(rows) if r["status"] == "done"), None)
            document = {
                "campaign": campaign.name,
                "status": campaign.status,
                "folder": campaign.workdir,
                "created_at": campaign.created_at,
                "updated_at": campaign.updated_at,
                "calculations": outcomes,
                "iterations": rows,
                "stop_reason": next((r.stop_reason for r in reversed(campaign.iterations) if r.stop_reason), None),
                "latest_model_version": last["model_version"] if last else None,
            }
            typer.echo(json.dumps(document, default=json_default, indent=1))
            return
        console.print(render(rows, f"{campaign.name} ({campaign.status}) — {campaign.workdir}"))


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
    cfg = load_campaign(config)
    check_reference(cfg, config)
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=cron)
        except ValidationError:
            fail(f"--cron {cron!r} is not a valid cron expression")
    if not os.environ.get("PREFECT_API_URL"):
        fail(
            "set PREFECT_API_URL to your Prefect server's API (e.g. http://127.0.0.1:4200/api); "
            "a deployment needs a server that outlives this command"
        )
    prefect_environment()
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
        fail(f"deploying {cfg.name} failed: {exc}")
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
