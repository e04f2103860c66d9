"""Fault injection in a real campaign: a code that crashes, hangs, writes garbage and does not
converge. The campaign records why each calculation failed, stops cleanly at the failure cap
with a report, and resumes, computing nothing twice, once the cap is raised."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from ionflow.db import Calculation, Campaign, Iteration, Model, TrainingMember, session_scope

from .conftest import tiny_campaign, write_campaign

FAULTY = str(Path(__file__).parents[1] / "dft_adapters" / "faulty.py") + ":FaultyXTB"


def reference(counter: Path, cap: float) -> dict:
    # runs 0-5 of the code misbehave; the bootstrap labels its 9 structures one by one in order:
    # 0 crashes, 1 hangs, 2 writes garbage, 3 does not converge (nor on its retry: run 4),
    # 4 does not converge but its retry (run 6) does; the rest are fine
    return {
        "adapter": "ase",
        "timeout_s": 10,  # ample for a healthy run on a loaded 2-core machine; the hang costs this much
        "max_failure_ratio": cap,
        "settings": {
            "calculator": FAULTY,
            "parameters": {
                "faults": ["crash", "hang", "garbage", "unconverged", "unconverged", "unconverged"],
                "counter": str(counter),
            },
            "charge_parameter": "charge",
            "multiplicity_parameter": "multiplicity",
            "unconverged_patterns": ["SCC NOT CONVERGED"],
            "retries": [{"max_iterations": 500}],
        },
    }


def runs_of_the_code(counter: Path) -> int:
    return int(counter.read_text())


def test_failures_are_recorded_the_cap_stops_the_campaign_and_it_resumes(tmp_path, prefect_server):
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context

    counter = tmp_path / "count"
    config = tiny_campaign(tmp_path, iterations=1, reference=reference(counter, cap=0.2))
    summary = campaign_flow(str(write_campaign(tmp_path, config)))

    # stopped cleanly after the bootstrap labels, with the report
    assert summary["status"] == "stopped"
    assert "4 of 9 reference calculations (44%)" in summary["stop_reason"]
    assert summary["calculations"] == {"ok": 5, "failed": 2, "timeout": 1, "unconverged": 1}
    assert [f["status"] for f in summary["failures"]] == ["failed", "timeout", "failed", "unconverged"]
    assert runs_of_the_code(counter) == 11  # 9 structures and a retry of each of the two unconverged

    ctx = context(str((tmp_path / "campaign.yaml").resolve()))
    with session_scope(ctx.sessions) as session:
        assert session.scalar(select(Campaign.status)) == "stopped"
        assert session.scalar(select(Model.id)) is None
        calcs = {c.structure_id: c for c in session.scalars(select(Calculation)).all()}
        first = [calcs[i] for i in sorted(calcs)]
        crash, hang, garbage, stubborn, rescued = first[:5]
        assert crash.status == "failed" and "CalculationFailed" in crash.error
        assert hang.status == "timeout" and "10 s" in hang.error
        assert garbage.status == "failed" and "ValueError" in garbage.error
        assert (
            stubborn.status == "unconverged" and "SCC NOT CONVERGED" in stubborn.error and "retries" in stubborn.error
        )
        assert rescued.status == "ok" and rescued.settings["run"]["retries"] == [{"max_iterations": 500}]
        for calc in first:
            # the records: code and version, settings hash, wall time, host, run folder
            assert calc.code_version.startswith("faultyxtb ") and calc.adapter == "ase"
            assert calc.settings_hash == ctx.adapter.settings_hash
            assert calc.wall_time_s > 0 and calc.host
            assert not Path(calc.run_dir).is_absolute() and (ctx.folder / calc.run_dir / "result.json").is_file()
            assert (calc.energy is None) == (calc.status != "ok")
        bootstrap_ids = sorted(c.id for c in first)

    # raise the cap (not part of the science: the same campaign) and run again
    config["reference"]["max_failure_ratio"] = 0.5
    summary = campaign_flow(str(write_campaign(tmp_path, config, name="resume.yaml")))
    assert summary["status"] == "finished", summary["stop_reason"]
    with session_scope(ctx.sessions) as session:
        iteration0 = session.scalar(select(Iteration.id).where(Iteration.index == 0))
        again = sorted(session.scalars(select(Calculation.id).where(Calculation.iteration_id == iteration0)).all())
        assert again == bootstrap_ids  # no bootstrap calculation repeated or lost
        assert runs_of_the_code(counter) == 11 + session.scalar(
            select(func.count()).select_from(Calculation).where(Calculation.iteration_id != iteration0)
        )
        # nothing that did not converge or failed reached a training set
        trained_on = session.scalars(
            select(Calculation.status).join(TrainingMember, TrainingMember.calculation_id == Calculation.id)
        ).all()
        assert trained_on and set(trained_on) == {"ok"}
        assert session.scalar(select(Campaign.status)) == "finished"
