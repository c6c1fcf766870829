"""The invariants every chaos scenario checks over the whole database afterwards."""

from __future__ import annotations

from sqlalchemy import Connection, text

# name -> a query returning one row per violation
INVARIANT_QUERIES: dict[str, str] = {
    "a task has more than one transition to SUCCEEDED": """
        SELECT task_id, count(*) FROM task_events WHERE to_status = 'SUCCEEDED'
        GROUP BY task_id HAVING count(*) > 1
    """,
    "attempt exceeds max_retries + 1 (counted from the last replay)": """
        SELECT id, attempt, max_retries FROM tasks WHERE attempt - retry_base_attempt > max_retries + 1
    """,
    "a DEAD attempt without exactly one dlq_events row": """
        SELECT e.task_id, e.attempt, count(d.id) FROM task_events e
        LEFT JOIN dlq_events d ON d.task_id = e.task_id AND d.attempt = e.attempt
        WHERE e.to_status = 'DEAD' GROUP BY e.task_id, e.attempt HAVING count(d.id) <> 1
    """,
    "a dlq_events row without a DEAD transition": """
        SELECT d.task_id, d.attempt FROM dlq_events d
        WHERE NOT EXISTS (SELECT 1 FROM task_events e
                          WHERE e.task_id = d.task_id AND e.attempt = d.attempt AND e.to_status = 'DEAD')
    """,
    "something follows a terminal state other than an explicit retry": """
        SELECT task_id, prev_to, from_status, to_status FROM (
            SELECT task_id, from_status, to_status,
                   lag(to_status) OVER (PARTITION BY task_id ORDER BY id) AS prev_to
            FROM task_events) s
        WHERE prev_to IN ('SUCCEEDED', 'DEAD', 'CANCELLED') AND to_status <> 'PENDING'
    """,
    "an event does not start where the previous one ended": """
        SELECT task_id, prev_to, from_status FROM (
            SELECT task_id, from_status, lag(to_status) OVER (PARTITION BY task_id ORDER BY id) AS prev_to
            FROM task_events) s
        WHERE prev_to IS DISTINCT FROM from_status
    """,
    "more than one worker claim per (task, attempt)": """
        SELECT task_id, attempt, count(*) FROM task_events WHERE to_status = 'STARTED'
        GROUP BY task_id, attempt HAVING count(*) > 1
    """,
    "event timestamps go backwards": """
        SELECT task_id, at, prev_at FROM (
            SELECT task_id, at, lag(at) OVER (PARTITION BY task_id ORDER BY id) AS prev_at FROM task_events) s
        WHERE at < prev_at
    """,
    "a task's status is not its last event's": """
        SELECT t.id, t.status, e.to_status FROM tasks t
        JOIN LATERAL (SELECT to_status FROM task_events WHERE task_id = t.id ORDER BY id DESC LIMIT 1) e ON true
        WHERE e.to_status <> t.status
    """,
}


def violations(conn: Connection) -> dict[str, list[tuple[object, ...]]]:
    """Every broken invariant with (up to 5) offending rows; empty when all hold."""
    found: dict[str, list[tuple[object, ...]]] = {}
    for name, query in INVARIANT_QUERIES.items():
        rows = [tuple(r) for r in conn.execute(text(query + " LIMIT 5"))]
        if rows:
            found[name] = rows
    return found


def status_counts(conn: Connection) -> dict[str, int]:
    return {s: n for s, n in conn.execute(text("SELECT status, count(*) FROM tasks GROUP BY status"))}


def unfinished(conn: Connection) -> int:
    return int(
        conn.execute(
            text("SELECT count(*) FROM tasks WHERE status NOT IN ('SUCCEEDED', 'DEAD', 'CANCELLED')")
        ).scalar_one()
    )
