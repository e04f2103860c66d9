"""Deployments: the campaign on Prefect work pools, run by workers on a cluster.

``ionflow deploy CAMPAIGN.yaml`` (or :func:`deploy_campaign`) registers, on the Prefect
server at ``PREFECT_API_URL``:

* work pools ``cpu`` and ``gpu`` (process type) if they do not exist yet;
* a task concurrency limit on the tag ``ionflow-label``: at most that many label steps run at
  once across every campaign (each step itself runs ``reference.workers`` calculations);
* the deployment ``ionflow-campaign/NAME`` on the cpu pool: the campaign flow, which runs the
  bootstrap, selection and the reference calculations; its parameter is the campaign file's
  absolute path, optionally with a cron schedule for recurring campaigns;
* with a gpu pool, the deployment ``ionflow-gpu-step/NAME`` on it: MD exploration and training,
  which the campaign flow then runs there (``run_deployment``, as sub-flow runs) instead of in
  its own process. Those steps use a CUDA device when the worker has one.

The code is deployed from this installation's folder (workers on the same file system, as on
a cluster with a shared home), so nothing is built or pushed. Tasks pass ids and paths only.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound

from ionflow.config import load_config
from ionflow.flows.label import LABEL_TAG

#: The folder that holds the ``ionflow`` package: the deployments' source.
SOURCE = Path(__file__).resolve().parents[2]


@dataclass
class Deployed:
    """What :func:`deploy_campaign` registered."""

    campaign: str
    deployment_id: uuid.UUID
    gpu_deployment_id: uuid.UUID | None
    work_pool: str
    gpu_pool: str | None
    cron: str | None
    label_concurrency: int | None


def ensure_work_pool(name: str) -> bool:
    """Create process work pool ``name`` unless it exists; True when it was created."""
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                )
            )
            return True


def set_label_concurrency(limit: int) -> None:
    """At most ``limit`` label steps at once on this server (tag ``ionflow-label``)."""
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=LABEL_TAG, concurrency_limit=limit)


def deploy_campaign(
    config_path: str | Path,
    work_pool: str = "cpu",
    gpu_pool: str | None = "gpu",
    cron: str | None = None,
    label_concurrency: int | None = None,
    create_pools: bool = True,
) -> Deployed:
    """Register the campaign's deployments (see the module docstring); the campaign file is
    validated first. Requires a Prefect server (``PREFECT_API_URL``)."""
    path = Path(config_path).resolve()
    cfg = load_config(path)
    pools = [work_pool] + ([gpu_pool] if gpu_pool else [])
    if create_pools:
        for pool in pools:
            ensure_work_pool(pool)
    if label_concurrency is not None:
        set_label_concurrency(label_concurrency)
    gpu_id = None
    gpu_name = None
    if gpu_pool:
        gpu_id = _deploy(
            "gpu_step_flow", cfg.name, gpu_pool, f"MD and training steps of ionflow campaign {cfg.name} ({path})"
        )
        gpu_name = f"ionflow-gpu-step/{cfg.name}"
    deployment_id = _deploy(
        "campaign_flow",
        cfg.name,
        work_pool,
        f"ionflow campaign {cfg.name} ({path})",
        parameters={"config_path": str(path), "gpu_deployment": gpu_name},
        cron=cron,
    )
    return Deployed(cfg.name, deployment_id, gpu_id, work_pool, gpu_pool, cron, label_concurrency)


def _deploy(flow_name: str, name: str, work_pool: str, description: str, **options: Any) -> uuid.UUID:
    """Deploy the flow ``flow_name`` of :mod:`ionflow.flows.campaign` from this installation's
    source (no image built, nothing pushed), as ``name`` on ``work_pool``, tagged with the campaign."""
    from ionflow.flows import campaign

    flow = getattr(campaign, flow_name)
    return flow.from_source(source=str(SOURCE), entrypoint=f"ionflow/flows/campaign.py:{flow_name}").deploy(
        name=name,
        work_pool_name=work_pool,
        tags=["ionflow", name],
        build=False,
        push=False,
        print_next_steps=False,
        description=description,
        **options,
    )
