"""The dead-letter audit trail: one `dlq_events` row per DEAD (task, attempt)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Connection, RowMapping

from taskscheduler import metrics
from taskscheduler.lifecycle import TaskStatus
from taskscheduler.store.sql import NOW, status_guard
from taskscheduler.store.transitions import storable_error

RECORD_DLQ_EVENT = f"""
    WITH inserted AS (
        INSERT INTO dlq_events (task_id, attempt, task_name, reason, error)
        VALUES (%(task_id)s, %(attempt)s, %(task_name)s, %(reason)s, %(error)s)
        ON CONFLICT (task_id, attempt) DO NOTHING
        RETURNING id
    ), flagged AS (
        UPDATE tasks SET dlq_recorded = true
        WHERE id = %(task_id)s AND attempt = %(attempt)s AND NOT dlq_recorded
          AND {status_guard("status", TaskStatus.DEAD)}
    )
    SELECT count(*) FROM inserted
    """


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
    inserted = bool(conn.exec_driver_sql(RECORD_DLQ_EVENT, params).scalar_one())
    if inserted:
        metrics.DLQ_EVENTS.labels(reason=reason).inc()
    return inserted


LIST_DLQ_EVENTS = (
    "SELECT id, task_id, task_name, attempt, reason, error, created_at FROM dlq_events"
    " ORDER BY created_at DESC, id DESC LIMIT %(limit)s"
)


def list_dlq_events(conn: Connection, *, limit: int = 100) -> list[RowMapping]:
    return list(conn.exec_driver_sql(LIST_DLQ_EVENTS, {"limit": limit}).mappings())


DELETE_OLD_DLQ_EVENTS = f"""
    DELETE FROM dlq_events WHERE id IN (
        SELECT id FROM dlq_events
        WHERE created_at < {NOW} - make_interval(secs => %(older_than_sec)s)
        ORDER BY created_at
        LIMIT %(limit)s
    )
    """


def delete_old(conn: Connection, *, older_than_sec: float, limit: int, now: datetime | None = None) -> int:
    """Delete up to `limit` dlq_events created more than `older_than_sec` ago. Returns how many."""
    params = {"older_than_sec": older_than_sec, "limit": limit, "now": now}
    return conn.exec_driver_sql(DELETE_OLD_DLQ_EVENTS, params).rowcount
