"""Every change of a task's status, each one guarded SQL statement that also writes its event row.

A transition names the status it expects (and, after dispatch, the attempt). When no row matches,
someone else moved the task first, and the function says so by returning None/False: the caller
drops its stale work. Nothing outside this package writes `tasks.status`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from taskscheduler.lifecycle import DlqReason, TaskStatus

MAX_ERROR_CHARS = 4000

# The database clock decides every time question; tests pass an explicit `now` to travel in time.
_NOW = "COALESCE(CAST(:now AS timestamptz), now())"


def _clip(error: str | None) -> str | None:
    return None if error is None else error[:MAX_ERROR_CHARS]


@dataclass(frozen=True)
class Dispatched:
    id: uuid.UUID
    attempt: int
    queue: str
    timeout_sec: float | None


@dataclass(frozen=True)
class Claimed:
    name: str
    payload: dict[str, Any]
    timeout_sec: float | None
    max_retries: int
    retry_base_attempt: int


@dataclass(frozen=True)
class Started:
    """A STARTED task as the stuck sweep sees it."""

    id: uuid.UUID
    attempt: int
    max_retries: int
    retry_base_attempt: int
    by_heartbeat: bool


@dataclass(frozen=True)
class DeadUnrecorded:
    id: uuid.UUID
    attempt: int
    name: str
    reason: str
    error: str | None


_CREATE = text(
    """
    WITH created AS (
        INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries, timeout_sec)
        VALUES (:id, :name, :payload, :priority, :queue, 'PENDING', COALESCE(:run_at, now()),
                :max_retries, :timeout_sec)
        RETURNING *
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, NULL, 'PENDING', 0, 'created' FROM created
    )
    SELECT * FROM created
    """
).bindparams(bindparam("payload", type_=JSONB))


def create_task(
    conn: Connection,
    *,
    name: str,
    payload: dict[str, Any],
    priority: int,
    queue: str,
    run_at: datetime | None,
    max_retries: int,
    timeout_sec: float | None,
) -> RowMapping:
    row = (
        conn.execute(
            _CREATE,
            {
                "id": uuid.uuid4(),
                "name": name,
                "payload": payload,
                "priority": priority,
                "queue": queue,
                "run_at": run_at,
                "max_retries": max_retries,
                "timeout_sec": timeout_sec,
            },
        )
        .mappings()
        .one()
    )
    return row


def get_task(conn: Connection, task_id: uuid.UUID) -> RowMapping | None:
    return conn.execute(text("SELECT * FROM tasks WHERE id = :id"), {"id": task_id}).mappings().one_or_none()


def list_events(conn: Connection, task_id: uuid.UUID) -> list[RowMapping]:
    return list(
        conn.execute(
            text("SELECT at, from_status, to_status, attempt, detail FROM task_events WHERE task_id = :id ORDER BY id"),
            {"id": task_id},
        ).mappings()
    )


# PENDING/FAILED -> ENQUEUED for a batch of due tasks. SKIP LOCKED lets several schedulers share the
# work without waiting on each other; the status guard in the UPDATE is belt and braces.
_DISPATCH = text(
    f"""
    WITH due AS (
        SELECT id, status FROM tasks
        WHERE status IN ('PENDING', 'FAILED') AND run_at <= {_NOW}
        ORDER BY priority DESC, run_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE tasks t
        SET status = 'ENQUEUED', attempt = t.attempt + 1, published_at = now(), updated_at = now()
        FROM due
        WHERE t.id = due.id AND t.status = due.status
        RETURNING t.id, t.attempt, t.queue, t.priority, t.run_at, t.timeout_sec, due.status AS from_status
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt)
        SELECT id, from_status, 'ENQUEUED', attempt FROM moved
    )
    SELECT id, attempt, queue, timeout_sec FROM moved ORDER BY priority DESC, run_at
    """
)


def dispatch_due(conn: Connection, *, limit: int, now: datetime | None = None) -> list[Dispatched]:
    rows = conn.execute(_DISPATCH, {"limit": limit, "now": now})
    return [Dispatched(id=r.id, attempt=r.attempt, queue=r.queue, timeout_sec=r.timeout_sec) for r in rows]


def _guarded(set_clause: str, *, src: TaskStatus, dst: TaskStatus, returning: str = "t.id") -> str:
    """One statement: move (id, attempt) from `src` to `dst` and append the event row."""
    return f"""
    WITH moved AS (
        UPDATE tasks t SET status = '{dst.value}', updated_at = now(), {set_clause}
        WHERE t.id = :id AND t.attempt = :attempt AND t.status = '{src.value}'
        RETURNING {returning}
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, '{src.value}', '{dst.value}', :attempt, :detail FROM moved
    )
    SELECT * FROM moved
    """


_CLAIM = text(
    _guarded(
        "started_at = now(), heartbeat_at = now()",
        src=TaskStatus.ENQUEUED,
        dst=TaskStatus.STARTED,
        returning="t.id, t.name, t.payload, t.timeout_sec, t.max_retries, t.retry_base_attempt",
    )
)


def claim(conn: Connection, *, task_id: uuid.UUID, attempt: int, worker: str | None = None) -> Claimed | None:
    """ENQUEUED -> STARTED. None when the message is stale (duplicate, cancelled, re-dispatched)."""
    row = conn.execute(_CLAIM, {"id": task_id, "attempt": attempt, "detail": worker}).one_or_none()
    if row is None:
        return None
    return Claimed(
        name=row.name,
        payload=row.payload,
        timeout_sec=row.timeout_sec,
        max_retries=row.max_retries,
        retry_base_attempt=row.retry_base_attempt,
    )


_HEARTBEAT = text("UPDATE tasks SET heartbeat_at = now() WHERE id = :id AND attempt = :attempt AND status = 'STARTED'")


def heartbeat(conn: Connection, *, task_id: uuid.UUID, attempt: int) -> bool:
    """Not a transition: refreshes the liveness of a running attempt. False once it was taken away."""
    return conn.execute(_HEARTBEAT, {"id": task_id, "attempt": attempt}).rowcount == 1


_SUCCEED = text(
    _guarded(
        "result = :result, last_error = NULL, finished_at = now()",
        src=TaskStatus.STARTED,
        dst=TaskStatus.SUCCEEDED,
    )
).bindparams(bindparam("result", type_=JSONB(none_as_null=True)))


def succeed(conn: Connection, *, task_id: uuid.UUID, attempt: int, result: Any) -> bool:
    params = {"id": task_id, "attempt": attempt, "result": result, "detail": None}
    return conn.execute(_SUCCEED, params).first() is not None


_FAIL = text(
    _guarded(
        "last_error = :error, run_at = now() + make_interval(secs => :retry_in_sec)",
        src=TaskStatus.STARTED,
        dst=TaskStatus.FAILED,
    )
)


def fail(conn: Connection, *, task_id: uuid.UUID, attempt: int, error: str, retry_in_sec: float) -> bool:
    """STARTED -> FAILED, due again after `retry_in_sec`."""
    error = _clip(error) or ""
    params = {"id": task_id, "attempt": attempt, "error": error, "retry_in_sec": retry_in_sec, "detail": error}
    return conn.execute(_FAIL, params).first() is not None


_KILL = text(
    _guarded(
        "last_error = :error, dead_reason = :reason, dlq_recorded = false, finished_at = now(), published_at = now()",
        src=TaskStatus.STARTED,
        dst=TaskStatus.DEAD,
        returning="t.id, t.name",
    )
)


def kill(conn: Connection, *, task_id: uuid.UUID, attempt: int, error: str, reason: DlqReason) -> str | None:
    """STARTED -> DEAD; returns the task's name (for the DLQ message the caller publishes), or None."""
    error = _clip(error) or ""
    params = {"id": task_id, "attempt": attempt, "error": error, "reason": reason.value, "detail": f"{reason}: {error}"}
    row = conn.execute(_KILL, params).first()
    return None if row is None else str(row.name)


_LOCK_STUCK = text(
    f"""
    SELECT id, attempt, max_retries, retry_base_attempt,
           heartbeat_at < {_NOW} - make_interval(secs => :heartbeat_timeout_sec) AS by_heartbeat
    FROM tasks
    WHERE status = 'STARTED'
      AND (heartbeat_at < {_NOW} - make_interval(secs => :heartbeat_timeout_sec)
           OR started_at < {_NOW} - make_interval(secs => COALESCE(timeout_sec, :default_timeout_sec)))
    ORDER BY started_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)


def lock_stuck(
    conn: Connection,
    *,
    heartbeat_timeout_sec: float,
    default_timeout_sec: float,
    limit: int,
    now: datetime | None = None,
) -> list[Started]:
    """STARTED tasks whose worker went silent or that ran past their timeout, locked for this transaction."""
    rows = conn.execute(
        _LOCK_STUCK,
        {
            "now": now,
            "heartbeat_timeout_sec": heartbeat_timeout_sec,
            "default_timeout_sec": default_timeout_sec,
            "limit": limit,
        },
    )
    return [
        Started(
            id=r.id,
            attempt=r.attempt,
            max_retries=r.max_retries,
            retry_base_attempt=r.retry_base_attempt,
            by_heartbeat=bool(r.by_heartbeat),
        )
        for r in rows
    ]


_REPUBLISH_ENQUEUED = text(
    f"""
    WITH lost AS (
        SELECT id FROM tasks
        WHERE status = 'ENQUEUED' AND published_at < {_NOW} - make_interval(secs => :timeout_sec)
        ORDER BY published_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t SET published_at = {_NOW}
    FROM lost WHERE t.id = lost.id AND t.status = 'ENQUEUED'
    RETURNING t.id, t.attempt, t.queue, t.timeout_sec
    """
)


def take_lost_enqueued(
    conn: Connection, *, timeout_sec: float, limit: int, now: datetime | None = None
) -> list[Dispatched]:
    """ENQUEUED tasks unclaimed for `timeout_sec`; marks them published again (same attempt)."""
    rows = conn.execute(_REPUBLISH_ENQUEUED, {"now": now, "timeout_sec": timeout_sec, "limit": limit})
    return [Dispatched(id=r.id, attempt=r.attempt, queue=r.queue, timeout_sec=r.timeout_sec) for r in rows]


_REPUBLISH_DEAD = text(
    f"""
    WITH lost AS (
        SELECT id FROM tasks
        WHERE status = 'DEAD' AND NOT dlq_recorded
          AND published_at < {_NOW} - make_interval(secs => :timeout_sec)
        ORDER BY published_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t SET published_at = {_NOW}
    FROM lost WHERE t.id = lost.id AND t.status = 'DEAD'
    RETURNING t.id, t.attempt, t.name, t.dead_reason, t.last_error
    """
)


def take_unrecorded_dead(
    conn: Connection, *, timeout_sec: float, limit: int, now: datetime | None = None
) -> list[DeadUnrecorded]:
    """DEAD tasks whose DLQ record has not appeared within `timeout_sec`; marks them published again."""
    rows = conn.execute(_REPUBLISH_DEAD, {"now": now, "timeout_sec": timeout_sec, "limit": limit})
    return [
        DeadUnrecorded(id=r.id, attempt=r.attempt, name=r.name, reason=r.dead_reason, error=r.last_error) for r in rows
    ]
