"""The dead-letter audit trail: one `dlq_events` row per DEAD (task, attempt)."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection, RowMapping, text

_RECORD = text(
    """
    WITH inserted AS (
        INSERT INTO dlq_events (task_id, attempt, task_name, reason, error)
        VALUES (:task_id, :attempt, :task_name, :reason, :error)
        ON CONFLICT (task_id, attempt) DO NOTHING
        RETURNING id
    ), flagged AS (
        UPDATE tasks SET dlq_recorded = true
        WHERE id = :task_id AND attempt = :attempt AND status = 'DEAD' AND NOT dlq_recorded
    )
    SELECT count(*) FROM inserted
    """
)


def record_dlq_event(
    conn: Connection, *, task_id: uuid.UUID, attempt: int, task_name: str, reason: str, error: str | None
) -> bool:
    """Idempotent: a duplicate DLQ message for the same (task, attempt) adds nothing. True if inserted."""
    params = {"task_id": task_id, "attempt": attempt, "task_name": task_name, "reason": reason, "error": error}
    return bool(conn.execute(_RECORD, params).scalar_one())


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
