"""What operators do: read and list tasks, cancel, retry, retry the dead in bulk, count."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping

from taskscheduler import metrics
from taskscheduler.lifecycle import CANCELLABLE, RETRYABLE, TaskStatus
from taskscheduler.store.sql import in_list

GET_TASK = "SELECT * FROM tasks WHERE id = %(id)s"


def get_task(conn: Connection, task_id: uuid.UUID) -> RowMapping | None:
    return conn.exec_driver_sql(GET_TASK, {"id": task_id}).mappings().one_or_none()


# The events of a task that exists: a deleted task's events stay until their partition is dropped
# (store/partitions.py), and are nobody's to read meanwhile.
LIST_EVENTS = """
    SELECT at, from_status, to_status, attempt, detail FROM task_events
    WHERE task_id = %(id)s AND EXISTS (SELECT 1 FROM tasks WHERE id = %(id)s)
    ORDER BY id
    """


def list_events(conn: Connection, task_id: uuid.UUID) -> list[RowMapping]:
    return list(conn.exec_driver_sql(LIST_EVENTS, {"id": task_id}).mappings())


@dataclass(frozen=True)
class TaskFilter:
    statuses: Sequence[TaskStatus] = ()
    name: str | None = None
    queue: str | None = None
    created_after: datetime | None = None  # inclusive
    created_before: datetime | None = None  # exclusive
    schedule_id: uuid.UUID | None = None


# The one statement written per call: a page of tasks, with a WHERE of the filters given (each
# combination gets a plan of its own, where `param IS NULL OR ...` would get one poor plan for all).
LIST_TASKS = """
    SELECT id, name, priority, queue, status, run_at, attempt, max_retries, timeout_sec, last_error, dead_reason,
           idempotency_key, created_at, updated_at, started_at, finished_at, schedule_id, scheduled_for
    FROM tasks {where}
    ORDER BY created_at DESC, id DESC LIMIT %(limit)s
    """
LIST_TASKS_FILTERS = {
    # The one status of each branch of LIST_TASKS_BY_STATUS.
    "statuses": "status = s.status",
    "name": "name = %(name)s",
    "queue": "queue = %(queue)s",
    "created_after": "created_at >= %(created_after)s",
    "created_before": "created_at < %(created_before)s",
    "schedule_id": "schedule_id = %(schedule_id)s",
}
# Keyset pagination: after the (created_at, id) of the previous page's last task.
LIST_TASKS_AFTER = "(created_at, id) < (%(after_created_at)s, %(after_id)s)"
# With a status filter, LIST_TASKS once per status, each a page of that status's newest from
# tasks_status_created_idx, then merged. With `status = ANY(...)` the planner walks
# tasks_created_id_idx instead and filters (100 ms for a page of DEAD tasks among 1M finished ones,
# against 2.5 ms).
LIST_TASKS_BY_STATUS = """
    SELECT t.* FROM unnest(CAST(%(statuses)s AS text[])) AS s(status) CROSS JOIN LATERAL ({each}) t
    ORDER BY t.created_at DESC, t.id DESC LIMIT %(limit)s
    """


def list_tasks(
    conn: Connection, where: TaskFilter, *, limit: int, after: tuple[datetime, uuid.UUID] | None = None
) -> list[RowMapping]:
    """Tasks newest first, without payload and result, ordered by (created_at, id) descending.

    `after` is the (created_at, id) of the last task of the previous page (keyset pagination: a page
    never shifts when tasks are created meanwhile, and costs the same however deep it is).
    """
    filters = {
        "statuses": [str(s) for s in where.statuses] or None,
        "name": where.name,
        "queue": where.queue,
        "created_after": where.created_after,
        "created_before": where.created_before,
        "schedule_id": where.schedule_id,
    }
    params: dict[str, Any] = {key: value for key, value in filters.items() if value is not None}
    clauses = [LIST_TASKS_FILTERS[key] for key in params]
    if after is not None:
        clauses.append(LIST_TASKS_AFTER)
        params["after_created_at"], params["after_id"] = after
    params["limit"] = limit
    statement = LIST_TASKS.format(where="WHERE " + " AND ".join(clauses) if clauses else "")
    if "statuses" in params:
        statement = LIST_TASKS_BY_STATUS.format(each=statement)
    return list(conn.exec_driver_sql(statement, params).mappings())


TASK_COUNTS = "SELECT status, queue, count(*) FROM tasks GROUP BY status, queue"
# A scrape that takes longer than this is better missed than left to pile up behind the next ones.
TASK_COUNTS_TIMEOUT = "SET LOCAL statement_timeout = '5s'"


def task_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(status, queue, count) of every task now: one GROUP BY, for /metrics."""
    conn.exec_driver_sql(TASK_COUNTS_TIMEOUT)
    return [(r[0], r[1], int(r[2])) for r in conn.exec_driver_sql(TASK_COUNTS)]


LIMIT_LOCK_WAIT = "SELECT set_config('lock_timeout', %(ms)s, true)"


def limit_lock_wait(conn: Connection, seconds: float) -> None:
    """For the rest of this transaction, a statement that waits longer than `seconds` for a row lock
    fails (LockNotAvailable) instead of waiting."""
    conn.exec_driver_sql(LIMIT_LOCK_WAIT, {"ms": str(max(1, round(seconds * 1000)))})


@dataclass(frozen=True)
class Moved:
    """The outcome of an operator's transition: `row` when it happened, else the status that prevented it."""

    row: RowMapping | None
    status: TaskStatus | None  # the status the task is in now; None: no such task


def _by_id(set_clause: str, *, src: frozenset[TaskStatus], dst: TaskStatus) -> str:
    """One statement: move the task `%(id)s` from any status in `src` to `dst` and append its event.

    The task's row is locked first (FOR UPDATE waits for a transition in flight, then sees its
    result), so the status the event records as `from_status` is the one the update replaced.
    The statement returns the task's status either way, to tell "not found" from "not allowed".
    """
    return f"""
    WITH cur AS (
        SELECT id, status FROM tasks WHERE id = %(id)s FOR UPDATE
    ), moved AS (
        UPDATE tasks t SET status = '{dst.value}', updated_at = now(), {set_clause}
        FROM cur
        WHERE t.id = cur.id AND cur.status IN ({in_list(src)}) AND t.status = cur.status
        RETURNING t.id, t.attempt, t.queue, cur.status AS from_status
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, from_status, '{dst.value}', attempt, %(detail)s FROM moved
    )
    SELECT cur.status AS current_status, moved.queue AS moved_queue
    FROM cur LEFT JOIN moved ON moved.id = cur.id
    """


CANCEL = _by_id("finished_at = now()", src=CANCELLABLE, dst=TaskStatus.CANCELLED)

# A fresh retry budget from the current attempt (never reset: it is the fencing token), due now.
_RETRY_SET = (
    "run_at = now(), retry_base_attempt = t.attempt, finished_at = NULL, dead_reason = NULL, dlq_recorded = false"
)
RETRY = _by_id(_RETRY_SET, src=RETRYABLE, dst=TaskStatus.PENDING)


def _moved(conn: Connection, statement: str, task_id: uuid.UUID, detail: str, dst: TaskStatus) -> Moved:
    result = conn.exec_driver_sql(statement, {"id": task_id, "detail": detail}).one_or_none()
    if result is None:
        return Moved(row=None, status=None)
    if result.moved_queue is None:
        return Moved(row=None, status=TaskStatus(result.current_status))
    metrics.transition(result.current_status, dst, result.moved_queue)
    return Moved(row=get_task(conn, task_id), status=dst)


def cancel(conn: Connection, task_id: uuid.UUID, *, detail: str = "cancelled") -> Moved:
    """PENDING, FAILED or ENQUEUED -> CANCELLED. A message already published for it is then dropped by
    the worker's guarded claim; a STARTED or finished task is left alone (`row` None, `status` says why)."""
    return _moved(conn, CANCEL, task_id, detail, TaskStatus.CANCELLED)


def retry(conn: Connection, task_id: uuid.UUID, *, detail: str = "retried") -> Moved:
    """DEAD or CANCELLED -> PENDING, due now, with a fresh retry budget; the events so far are kept."""
    return _moved(conn, RETRY, task_id, detail, TaskStatus.PENDING)


RETRY_DEAD = f"""
    WITH picked AS (
        SELECT id FROM tasks
        WHERE status = 'DEAD'
          AND (CAST(%(name)s AS text) IS NULL OR name = %(name)s)
          AND (CAST(%(reason)s AS text) IS NULL OR dead_reason = %(reason)s)
          AND (CAST(%(since)s AS timestamptz) IS NULL OR finished_at >= %(since)s)
          AND finished_at <= %(until)s
        ORDER BY finished_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE tasks t SET status = 'PENDING', updated_at = now(), {_RETRY_SET}
        FROM picked
        WHERE t.id = picked.id AND t.status = 'DEAD'
        RETURNING t.id, t.attempt, t.queue
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, 'DEAD', 'PENDING', attempt, %(detail)s FROM moved
    )
    SELECT queue, count(*) AS n FROM moved GROUP BY queue
    """


def retry_dead(
    conn: Connection,
    *,
    name: str | None,
    reason: str | None,
    since: datetime | None,
    until: datetime,
    limit: int,
    detail: str = "retried from the DLQ",
) -> int:
    """Up to `limit` DEAD tasks (by name, DLQ reason, finished at or after `since` and not after `until`)
    -> PENDING, as `retry` does. Returns how many. Tasks locked by another transaction are skipped."""
    params = {"name": name, "reason": reason, "since": since, "until": until, "limit": limit, "detail": detail}
    total = 0
    for row in conn.exec_driver_sql(RETRY_DEAD, params):
        metrics.transition(TaskStatus.DEAD, TaskStatus.PENDING, row.queue, row.n)
        total += row.n
    return total
