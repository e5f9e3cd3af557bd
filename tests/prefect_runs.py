"""Read what one flow run (and its subflow runs) reported to the test session's Prefect.

The Prefect harness is shared by the whole session, so "the latest artifact with this key"
may be another test's. Artifacts are read by the fixture's own flow-run id instead."""

from __future__ import annotations

from uuid import UUID


def family(flow_run_id: UUID) -> list[UUID]:
    """The flow run and every subflow run below it."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    ids, todo = [flow_run_id], [flow_run_id]
    with get_client(sync_client=True) as c:
        while todo:
            kids = c.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=todo))
            )
            todo = [k.id for k in kids if k.id not in ids]
            ids += todo
    return ids


def run_artifacts(flow_run_id: UUID, keys: list[str]) -> dict:
    """key -> the newest artifact with that key made by this flow run or one of its subflows."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=keys), flow_run_id=ArtifactFilterFlowRunId(any_=family(flow_run_id))
            )
        )
    return {a.key: a for a in sorted(arts, key=lambda a: a.created)}
