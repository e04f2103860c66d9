"""The label step on a Dask cluster (prefect-dask, a LocalCluster): the same campaign, its
calculations spread as Prefect tasks over Dask worker processes."""

from __future__ import annotations

from sqlalchemy import func, select

from ionflow.db import Calculation, Campaign, session_scope

from .conftest import tiny_campaign, write_campaign


def test_campaign_labels_on_a_dask_local_cluster(tmp_path, prefect_server):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from ionflow.flows.campaign import campaign_flow
    from ionflow.flows.context import context

    config = tiny_campaign(tmp_path, iterations=1, execution={"task_runner": "dask", "dask_workers": 2})
    path = write_campaign(tmp_path, config)
    summary = campaign_flow(str(path))
    assert summary["status"] == "finished", summary["stop_reason"]
    ctx = context(str(path.resolve()))
    with session_scope(ctx.sessions) as session:
        assert session.scalar(select(Campaign.status)) == "finished"
        n_calcs = session.scalar(select(func.count()).select_from(Calculation))
        hosts_pids = session.scalars(select(Calculation.run_dir)).all()
        assert n_calcs == len(set(hosts_pids)) >= 9
        assert session.scalar(select(func.count()).select_from(Calculation).where(Calculation.status != "ok")) == 0
        flow_run_id = session.scalar(select(Campaign.prefect_flow_run_id))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    names = [t.task_key.rsplit("-", 1)[0] for t in runs]
    assert names.count("label_chunk_task") == 4  # 2 chunks for the bootstrap, 2 for iteration 1
    assert "label_task" not in names  # nothing labelled next to the flow
    assert all(t.state.is_completed() for t in runs)
