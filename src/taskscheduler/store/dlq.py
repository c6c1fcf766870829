"""The dead-letter audit trail: one `dlq_events` row per DEAD (task, attempt)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Connection, RowMapping, text

from taskscheduler import metrics
from taskscheduler.lifecycle import TaskStatus
from taskscheduler.store.tasks import status_guard, storable_error

_RECORD = text(
    f"""
    WITH inserted AS (
        INSERT INTO dlq_events (task_id, attempt, task_name, reason, error)
        VALUES (:task_id, :attempt, :task_name, :reason, :error)
        ON CONFLICT (task_id, attempt) DO NOTHING
        RETURNING id
    ), flagged AS (
        UPDATE tasks SET dlq_recorded = true
        WHERE id = :task_id AND attempt = :attempt AND NOT dlq_recorded
          AND {status_guard("status", TaskStatus.DEAD)}
    )
    SELECT count(*) FROM inserted
    """
)


def record_dlq_event(
    conn: Connection, *, task_id: uuid.UUID, attempt: int, task_name: str, reason: str, error: str | None
) -> bool:
    """Idempotent: a duplicate DLQ message for the same (task, attempt) adds nothing. True if inserted."""
    params = {
        "task_id": task_id,
        "attempt": attempt,
        "task_name": task_name,
        "reason": reason,
        "error": storable_error(error),
    }
    inserted = bool(conn.execute(_RECORD, params).scalar_one())
    if inserted:
        metrics.DLQ_EVENTS.labels(reason=reason).inc()
    return inserted


def list_dlq_events(conn: Connection, *, limit: int = 100) -> list[RowMapping]:
    return list(
        conn.execute(
            text(
                "SELECT id, task_id, task_name, attempt, reason, error, created_at FROM dlq_events"
                " ORDER BY created_at DESC, id DESC LIMIT :limit"
            ),
            {"limit": limit},
        ).mappings()
    )


_DELETE_OLD = text(
    """
    DELETE FROM dlq_events WHERE id IN (
        SELECT id FROM dlq_events
        WHERE created_at < COALESCE(CAST(:now AS timestamptz), now()) - make_interval(secs => :older_than_sec)
        ORDER BY created_at
        LIMIT :limit
    )
    """
)


def delete_old(conn: Connection, *, older_than_sec: float, limit: int, now: datetime | None = None) -> int:
    """Delete up to `limit` dlq_events created more than `older_than_sec` ago. Returns how many."""
    return conn.execute(_DELETE_OLD, {"older_than_sec": older_than_sec, "limit": limit, "now": now}).rowcount
