"""Reading tasks (one, a page, a task's events) and an operator's cancel and retry."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import HTTPException, Path, Query, status
from pydantic import TypeAdapter

from taskscheduler.api.deps import ConnDep, LockingConnDep, protected_router
from taskscheduler.api.errors import field_error, validation_error
from taskscheduler.api.schemas import IsoDatetime, NoNul, TaskEventOut, TaskOut, TaskPage, TaskSummary
from taskscheduler.config import MAX_JSON_DEPTH
from taskscheduler.jsonb import nested_deeper_than
from taskscheduler.lifecycle import CANCELLABLE, RETRYABLE, TERMINAL, TaskStatus
from taskscheduler.store import operations

router = protected_router("tasks")

TASK_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No task with this id."}}
REFUSABLE: dict[int | str, dict[str, Any]] = {
    **TASK_NOT_FOUND,
    409: {"description": "The task is in a status that does not allow this; `detail` says which."},
}

TaskId = Annotated[uuid.UUID, Path(description="The task's id, as `id` in the task (a UUID).")]


def not_found(task_id: uuid.UUID) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"task {task_id} not found")


def encode_cursor(created_at: datetime, task_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(task_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# A cursor is ours only if it decodes to exactly [aware ISO 8601 time, UUID]: anything else a client
# sends (other JSON, other types, naive or out-of-range times, deep nesting) is a 422, never a 500.
_CURSOR = TypeAdapter(tuple[IsoDatetime, uuid.UUID])
_BAD_CURSOR = "invalid cursor: pass the next_cursor of a previous page unchanged"


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, task_id = _CURSOR.validate_json(raw)
    except (ValueError, TypeError):  # binascii.Error and pydantic's ValidationError are ValueErrors
        raise validation_error([field_error(["query", "cursor"], _BAD_CURSOR)]) from None
    return created_at, task_id


@router.get("/tasks", summary="List tasks (filters, pagination)", response_model=TaskPage)
def list_tasks(
    conn: ConnDep,
    status_: Annotated[
        list[TaskStatus] | None,
        Query(alias="status", description="Only tasks in these statuses; repeat it: ?status=DEAD&status=FAILED"),
    ] = None,
    name: Annotated[
        str | None, Query(min_length=1, max_length=200, description="Only tasks of this name."), NoNul
    ] = None,
    queue: Annotated[Literal["high", "default", "low"] | None, Query(description="Only tasks of this queue.")] = None,
    created_after: Annotated[
        IsoDatetime | None, Query(description="Only tasks created at or after this time (ISO 8601 with offset).")
    ] = None,
    created_before: Annotated[
        IsoDatetime | None, Query(description="Only tasks created before this time (ISO 8601 with offset).")
    ] = None,
    schedule_id: Annotated[uuid.UUID | None, Query(description="Only tasks created by this schedule.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Tasks per page.")] = 100,
    cursor: Annotated[
        str | None, Query(max_length=200, description="The `next_cursor` of the previous page; omit for the first.")
    ] = None,
) -> TaskPage:
    """Tasks, newest first (by `created_at`, then `id`), without `payload` and `result`.

    Pages are keyset-paginated: follow `next_cursor` until it is null and you see every task that
    existed when you started exactly once, however many are created meanwhile (those may or may not
    appear). Filters combine with AND; the cursor must be used with the same filters.
    """
    after = decode_cursor(cursor) if cursor is not None else None
    where = operations.TaskFilter(
        statuses=status_ or (),
        name=name,
        queue=queue,
        created_after=created_after,
        created_before=created_before,
        schedule_id=schedule_id,
    )
    rows = operations.list_tasks(conn, where, limit=limit + 1, after=after)
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
    return TaskPage(tasks=[TaskSummary.model_validate(dict(r)) for r in page], next_cursor=next_cursor)


@router.get("/tasks/{task_id}", summary="Get a task", response_model=TaskOut, responses=TASK_NOT_FOUND)
def get_task(task_id: TaskId, conn: ConnDep) -> TaskOut:
    """The task, with its payload, result, status, attempt, last error and timestamps."""
    row = operations.get_task(conn, task_id)
    if row is None:
        raise not_found(task_id)
    task = dict(row)
    if nested_deeper_than(task["result"], MAX_JSON_DEPTH):
        # Stored before workers checked results: it cannot be serialised, and must not make the
        # whole task unreadable (a 500 on every read).
        task["result"] = f"(not shown: the result is nested deeper than {MAX_JSON_DEPTH} levels)"
    return TaskOut.model_validate(task)


@router.get(
    "/tasks/{task_id}/events",
    summary="A task's transitions",
    response_model=list[TaskEventOut],
    responses=TASK_NOT_FOUND,
)
def get_task_events(task_id: TaskId, conn: ConnDep) -> list[TaskEventOut]:
    """Every transition of the task, oldest first."""
    events = operations.list_events(conn, task_id)
    if not events and operations.get_task(conn, task_id) is None:
        raise not_found(task_id)
    return [TaskEventOut.model_validate(dict(e)) for e in events]


# --- cancel and retry ---------------------------------------------------------------------------------------------


def refusal(
    task_id: uuid.UUID, current: TaskStatus | None, verb: str, past: str, allowed: frozenset[TaskStatus]
) -> HTTPException:
    """The 404 or 409 that says why an operator's `verb` did not move the task (now in `current`;
    None: there is no such task). The dashboard shows the same words."""
    if current is None:
        return not_found(task_id)
    if current == TaskStatus.STARTED:
        why = "it is running (STARTED); it will succeed, fail or be rescued"
    elif current in TERMINAL:
        why = f"it has already finished ({current})"
    else:
        why = f"it is {current}"
    detail = f"cannot {verb} task {task_id}: {why}. Only {', '.join(sorted(allowed))} tasks can be {past}"
    return HTTPException(status.HTTP_409_CONFLICT, detail=detail)


def _moved(
    task_id: uuid.UUID, moved: operations.Moved, verb: str, past: str, allowed: frozenset[TaskStatus]
) -> TaskOut:
    """The task `moved`, or the 404 or 409 that says why it was not."""
    if moved.row is None:
        raise refusal(task_id, moved.status, verb, past, allowed)
    return TaskOut.model_validate(dict(moved.row))


@router.post("/tasks/{task_id}/cancel", summary="Cancel a task", response_model=TaskOut, responses=REFUSABLE)
def cancel_task(task_id: TaskId, conn: LockingConnDep) -> TaskOut:
    """Cancel a PENDING, FAILED or ENQUEUED task: it becomes CANCELLED and never runs.

    A message already on its way to a worker is dropped when it arrives. A STARTED task cannot be
    cancelled (409), nor a finished one. A cancelled task can be brought back with `retry`.
    """
    moved = operations.cancel(conn, task_id, detail="cancelled via the API")
    return _moved(task_id, moved, "cancel", "cancelled", CANCELLABLE)


@router.post(
    "/tasks/{task_id}/retry", summary="Retry a DEAD or CANCELLED task", response_model=TaskOut, responses=REFUSABLE
)
def retry_task(task_id: TaskId, conn: LockingConnDep) -> TaskOut:
    """Run a DEAD or CANCELLED task again: PENDING now, with a fresh retry budget (`max_retries` more
    retries), the same id, and its events so far kept. Other statuses are a 409."""
    moved = operations.retry(conn, task_id, detail="retried via the API")
    return _moved(task_id, moved, "retry", "retried", RETRYABLE)
