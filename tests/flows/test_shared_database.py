"""Two campaigns in one database: shared structures and calculations, separate memberships.

Campaigns ``tiny-a`` and ``tiny-b`` have the same system and seed, so their bootstrap
rattles are the same structures. The second must reuse the first's calculations (a
calculation is never repeated, whoever asked for it) and still see those structures
as its own: its training pool, test set and iteration table are complete.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from ionflow.db import (
    Calculation,
    Campaign,
    CampaignStructure,
    Iteration,
    Model,
    SelectionDecision,
    campaign_by_name,
    iteration_table,
    session_scope,
    sqlite_url,
)
from ionflow.platform.structures import read_structures

from .conftest import tiny_campaign, write_campaign

N_TRAIN, N_TEST = 6, 3


@pytest.fixture(scope="module")
def shared(tmp_path_factory, prefect_server):
    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context

    tmp = tmp_path_factory.mktemp("shared")
    url = sqlite_url(tmp / "shared.db")
    paths = {
        name: write_campaign(tmp, tiny_campaign(tmp, name=name, database_url=url, iterations=1), f"{name}.yaml")
        for name in ("tiny-a", "tiny-b")
    }
    # one after the other: b starts once a's bootstrap labels are all in the database
    summaries = {name: campaign_flow(str(path)) for name, path in paths.items()}
    contexts = {name: context(str(path.resolve())) for name, path in paths.items()}
    assert contexts["tiny-a"].config.db_url == contexts["tiny-b"].config.db_url == url
    return summaries, contexts


def _chosen(session, campaign_id: int) -> set[int]:
    """Ids of the structures the campaign chose for labelling after bootstrap."""
    return set(
        session.scalars(
            select(SelectionDecision.structure_id)
            .join(Iteration, SelectionDecision.iteration_id == Iteration.id)
            .where(Iteration.campaign_id == campaign_id, SelectionDecision.chosen.is_(True))
        )
    )


def _ok_calculations(session, structure_ids: set[int]) -> set[int]:
    return set(
        session.scalars(
            select(Calculation.id).where(Calculation.structure_id.in_(structure_ids), Calculation.status == "ok")
        )
    )


def _bootstrap_members(session, campaign_id: int) -> dict[int, str]:
    """structure id -> origin of the campaign's iteration-0 structures."""
    rows = session.execute(
        select(CampaignStructure.structure_id, CampaignStructure.origin)
        .join(Iteration, CampaignStructure.iteration_id == Iteration.id)
        .where(CampaignStructure.campaign_id == campaign_id, Iteration.index == 0)
    ).all()
    return dict(rows)


def test_both_campaigns_finish(shared):
    summaries, contexts = shared
    for name, summary in summaries.items():
        assert summary["stop_reason"] in (
            "finished 1 iterations",
            "converged: no explored frame was uncertain enough to label",
        )
        assert summary["model"] is not None and summary["model"].startswith(str(contexts[name].folder))
    with session_scope(contexts["tiny-a"].sessions) as s:
        campaigns = s.scalars(select(Campaign).order_by(Campaign.id)).all()
        assert [(c.name, c.status) for c in campaigns] == [("tiny-a", "finished"), ("tiny-b", "finished")]


def test_bootstrap_structures_are_shared_and_computed_once(shared):
    _, contexts = shared
    with session_scope(contexts["tiny-a"].sessions) as s:
        a, b = campaign_by_name(s, "tiny-a"), campaign_by_name(s, "tiny-b")
        in_a, in_b = _bootstrap_members(s, a.id), _bootstrap_members(s, b.id)
        # the same structures, each in the same role in both campaigns
        assert in_a == in_b
        assert sorted(in_a.values()) == ["initial"] * N_TRAIN + ["test"] * N_TEST
        per_structure = dict(
            s.execute(
                select(Calculation.structure_id, func.count())
                .where(Calculation.structure_id.in_(in_a))
                .group_by(Calculation.structure_id)
            ).all()
        )
        assert per_structure == dict.fromkeys(in_a, 1)  # no DFT repeated
        # all of them computed by a, in its bootstrap iteration; b computed none of them
        computed_in = set(s.scalars(select(Calculation.iteration_id).where(Calculation.structure_id.in_(in_a))))
        a0 = s.scalar(select(Iteration.id).where(Iteration.campaign_id == a.id, Iteration.index == 0))
        assert computed_in == {a0}
        b_iterations = select(Iteration.id).where(Iteration.campaign_id == b.id)
        b_calcs = s.scalars(select(Calculation).where(Calculation.iteration_id.in_(b_iterations))).all()
        assert not {c.structure_id for c in b_calcs} & set(in_a)


def test_each_model_is_trained_on_its_campaigns_full_pool(shared):
    _, contexts = shared
    with session_scope(contexts["tiny-a"].sessions) as s:
        for name in ("tiny-a", "tiny-b"):
            campaign = campaign_by_name(s, name)
            # the bootstrap training structures and the chosen frames, whoever computed them
            bootstrap = {k for k, origin in _bootstrap_members(s, campaign.id).items() if origin == "initial"}
            chosen = _chosen(s, campaign.id)
            models = s.scalars(select(Model).where(Model.campaign_id == campaign.id).order_by(Model.version)).all()
            assert [m.version for m in models] == list(range(len(models))) and len(models) >= 1
            trained_on = [{t.calculation_id for t in m.training_members} for m in models]
            assert trained_on[0] == _ok_calculations(s, bootstrap) and len(trained_on[0]) == N_TRAIN
            assert trained_on[-1] == _ok_calculations(s, bootstrap | chosen)  # the newest: the whole pool
            assert all(m.metrics["test_n_structures"] == N_TEST for m in models)


def test_iteration_tables_report_each_campaigns_own_labels(shared):
    summaries, contexts = shared
    with session_scope(contexts["tiny-a"].sessions) as s:
        for name in ("tiny-a", "tiny-b"):
            campaign = campaign_by_name(s, name)
            table = iteration_table(s, campaign.id)
            assert table == summaries[name]["iterations"]
            assert [row["index"] for row in table] == [0, 1]
            assert table[0]["n_labels"] == N_TRAIN + N_TEST
            assert table[0]["model_version"] == 0 and table[0]["n_failed"] == 0
            labels = _ok_calculations(s, set(_bootstrap_members(s, campaign.id)) | _chosen(s, campaign.id))
            assert table[-1]["n_labels"] == len(labels)


def test_each_campaign_folder_holds_its_own_outputs(shared):
    summaries, contexts = shared
    for name, summary in summaries.items():
        folder = str(contexts[name].folder)
        assert summary["dataset"].startswith(folder) and summary["test_set"].startswith(folder)
        dataset = read_structures(summary["dataset"])
        assert len(dataset) >= N_TRAIN and all("REF_forces" in a.arrays for a in dataset)
        assert len(read_structures(summary["test_set"])) == N_TEST
