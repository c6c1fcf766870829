"""`GET /tasks/{id}/explain`: why a task is not running yet, in words and as codes (see `taskscheduler.explain`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Connection

from taskscheduler import explain
from taskscheduler.api.deps import ConnDep, SettingsDep, protected_router
from taskscheduler.api.tasks import TASK_NOT_FOUND, TaskId, not_found
from taskscheduler.config import Settings
from taskscheduler.lifecycle import TaskStatus
from taskscheduler.store import operations, views

router = protected_router("tasks")


class ReasonOut(BaseModel):
    code: explain.ReasonCode = Field(description="What holds the task back, as a stable code for scripts.")
    message: str = Field(description="The same in words, with the numbers that matter.")
    until: datetime | None = Field(description="When this reason clears by itself (a run_at, a retry's backoff).")


class ExplainOut(BaseModel):
    task_id: uuid.UUID = Field(description="The task.")
    status: TaskStatus = Field(description="Its status now.")
    reasons: list[ReasonOut] = Field(
        description="Every reason that holds now: the task's own wait first (run_at, backoff), then what holds its"
        " dispatch back, then its queue's workers. A STARTED or finished task has one that says so (`running`,"
        " `finished`)."
    )


def reasons_for(conn: Connection, task: Mapping[Any, Any], settings: Settings) -> list[explain.Reason]:
    """Why `task` (its row) is not running, from its queue's facts read now."""
    facts = views.queue_facts(
        conn,
        dict(task),
        max_enqueued=settings.max_enqueued_per_queue,
        refill_at=explain.refill_at(settings.dispatch_batch_size, settings.max_enqueued_per_queue),
        stale_after_sec=explain.stale_after_sec(settings.process_heartbeat_sec),
        enqueue_timeout_sec=settings.enqueue_timeout_sec,
    )
    return explain.explain(task, facts)


@router.get(
    "/tasks/{task_id}/explain",
    summary="Why a task is not running yet",
    response_model=ExplainOut,
    responses=TASK_NOT_FOUND,
)
def explain_task(task_id: TaskId, conn: ConnDep, settings: SettingsDep) -> ExplainOut:
    """Why a PENDING, FAILED or ENQUEUED task is not running yet, from the data now: waiting for its
    `run_at` or a retry's backoff, its queue held back by back-pressure, no live worker for its queue
    or no live scheduler, due tasks ahead of it, a message that may have been lost. A STARTED or
    finished task gets one reason that says so."""
    row = operations.get_task(conn, task_id)
    if row is None:
        raise not_found(task_id)
    reasons = [ReasonOut(code=r.code, message=r.message, until=r.until) for r in reasons_for(conn, row, settings)]
    return ExplainOut(task_id=row["id"], status=row["status"], reasons=reasons)
