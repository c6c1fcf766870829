"""The dead-letter queue: its events, and retrying DEAD tasks in bulk."""

from __future__ import annotations

from typing import Annotated

from fastapi import Body, Query

from taskscheduler.api.deps import ConnDep, DatabaseDep, protected_router
from taskscheduler.api.schemas import DlqEventOut, DlqRetryFilter, DlqRetryOut
from taskscheduler.store import dlq, operations

router = protected_router("dlq")

# Tasks moved per transaction by POST /dlq/retry.
DLQ_RETRY_BATCH = 1000


@router.get("/dlq", summary="Dead-letter events", response_model=list[DlqEventOut])
def list_dlq(
    conn: ConnDep, limit: Annotated[int, Query(ge=1, le=500, description="Events to return, the newest.")] = 100
) -> list[DlqEventOut]:
    """Dead-letter events, newest first: one per task attempt that ended DEAD."""
    return [DlqEventOut.model_validate(dict(e)) for e in dlq.list_dlq_events(conn, limit=limit)]


@router.post("/dlq/retry", summary="Retry DEAD tasks in bulk", response_model=DlqRetryOut)
def retry_dlq(database: DatabaseDep, body: Annotated[DlqRetryFilter | None, Body()] = None) -> DlqRetryOut:
    """Retry every DEAD task that matches the filter (all of them with an empty body), as
    `POST /tasks/{id}/retry` does each. Returns how many. Tasks that die again while this runs are
    not retried twice."""
    where = body or DlqRetryFilter()
    total = 0
    until = database.now()
    while True:
        with database.transaction() as conn:
            n = operations.retry_dead(
                conn, name=where.name, reason=where.reason, since=where.since, until=until, limit=DLQ_RETRY_BATCH
            )
        total += n
        if n < DLQ_RETRY_BATCH:
            return DlqRetryOut(retried=total)
