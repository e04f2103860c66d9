"""The random and diverse selection strategies through a real (tiny) campaign: every explored frame
gets a decision with the strategy's reason, and the campaign finishes."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from ionflow.db import Iteration, SelectionDecision, session_scope

from .conftest import tiny_campaign, write_campaign


def run_campaign(tmp_path, strategy: str) -> tuple[dict, list[SelectionDecision]]:
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context

    # shorter still than tiny_campaign: the decisions, not the models, are under test
    config = tiny_campaign(
        tmp_path, iterations=1, training={"epochs": 8, "finetune_epochs": 4}, selection={"strategy": strategy}
    )
    path = write_campaign(tmp_path, config)
    summary = campaign_flow(str(path))
    with session_scope(context(str(path.resolve())).sessions) as session:
        decisions = session.scalars(
            select(SelectionDecision).join(Iteration).where(Iteration.index == 1).order_by(SelectionDecision.id)
        ).all()
        session.expunge_all()
    return summary, decisions


@pytest.mark.parametrize(
    ("strategy", "picked", "passed"),
    [
        ("random", ("random pick",), ("random: not drawn", "already labelled")),
        ("diverse", ("diverse: spread",), ("diverse: covered", "budget", "trusted", "above ceiling")),
    ],
)
def test_campaign_records_the_strategy_s_reasons(tmp_path, prefect_server, strategy, picked, passed):
    summary, decisions = run_campaign(tmp_path, strategy)
    assert summary["stop_reason"] == "finished 1 iterations"
    assert len(decisions) == 12  # 2 walkers x 30 steps / 5
    chosen = [d for d in decisions if d.chosen]
    assert 1 <= len(chosen) <= 3
    assert all(d.reason.startswith(picked) for d in chosen)
    assert all(d.reason.startswith(passed) for d in decisions if not d.chosen)
    assert all(d.score > 0 for d in decisions)  # the spread is recorded whatever the strategy
    if strategy == "random":
        assert len(chosen) == 3
