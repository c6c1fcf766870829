"""A worker's transitions of one attempt: claim, heartbeat, succeed, fail, kill.

Each is one guarded statement that also writes its event row. It names the status it expects and
the attempt; when no row matches, someone else moved the task first (a duplicate message, a worker
declared stuck that wakes up later), and the function says so by returning None/False: the caller
drops its stale work. Nothing outside this package writes `tasks.status`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Row

from taskscheduler import metrics
from taskscheduler.lifecycle import DlqReason, TaskStatus
from taskscheduler.store.db import fetch_row
from taskscheduler.store.sql import status_guard

MAX_ERROR_CHARS = 4000


def storable_error(error: str | None) -> str | None:
    """An error text as a text column can hold it, the same wherever it is stored (`last_error`, an
    event's detail, `dlq_events.error`): NUL and lone surrogates, which PostgreSQL refuses, written
    as the escapes `\\x00` and `\\udce9`, and clipped to MAX_ERROR_CHARS characters."""
    if error is None:
        return None
    error = error[:MAX_ERROR_CHARS]  # first, so that a huge text costs no more than a short one
    if "\x00" in error:
        error = error.replace("\x00", "\\x00")
    if not error.isascii():
        error = error.encode("utf-8", "backslashreplace").decode("utf-8")
    return error[:MAX_ERROR_CHARS]


@dataclass(frozen=True)
class Claimed:
    name: str
    payload: dict[str, Any]
    timeout_sec: float | None
    max_retries: int
    retry_base_attempt: int


# What the outcome transitions return: the queue and the attempt's run time, for the metrics.
_OUTCOME = "t.id, t.queue, EXTRACT(EPOCH FROM now() - t.started_at)::float8 AS run_sec"


def _guarded(set_clause: str, *, src: TaskStatus, dst: TaskStatus, returning: str = _OUTCOME) -> str:
    """One statement: move (id, attempt) from `src` to `dst` and append the event row."""
    return f"""
    WITH moved AS (
        UPDATE tasks t SET status = '{dst.value}', updated_at = now(), {set_clause}
        WHERE t.id = %(id)s AND t.attempt = %(attempt)s AND {status_guard("t.status", src)}
        RETURNING {returning}
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, '{src.value}', '{dst.value}', %(attempt)s, %(detail)s FROM moved
    )
    SELECT * FROM moved
    """


_CLAIMED_COLUMNS = "t.id, t.name, t.payload, t.timeout_sec, t.max_retries, t.retry_base_attempt, t.queue"
# ENQUEUED -> STARTED, or the row this very claim (same token) already moved: the claim is sent again
# when its reply was lost, and must then find its own claim rather than drop the task. Both parts
# read the snapshot taken before the update, so at most one of them returns the row.
_CLAIM_PARTS = f"""
    moved AS (
        UPDATE tasks t SET status = 'STARTED', updated_at = now(), started_at = now(), heartbeat_at = now(),
                           claim_token = %(token)s
        WHERE t.id = %(id)s AND t.attempt = %(attempt)s AND {status_guard("t.status", TaskStatus.ENQUEUED)}
        RETURNING {_CLAIMED_COLUMNS}, EXTRACT(EPOCH FROM t.started_at - t.run_at)::float8 AS lag_sec, true AS fresh
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, 'ENQUEUED', 'STARTED', %(attempt)s, %(detail)s FROM moved
    ), mine AS (
        SELECT {_CLAIMED_COLUMNS}, 0::float8 AS lag_sec, false AS fresh FROM tasks t
        WHERE t.id = %(id)s AND t.attempt = %(attempt)s AND {status_guard("t.status", TaskStatus.STARTED)}
          AND t.claim_token = %(token)s
    )"""
CLAIM = f"""
    WITH {_CLAIM_PARTS}
    SELECT * FROM moved UNION ALL SELECT * FROM mine
    """

# One attempt's STARTED -> SUCCEEDED (SUCCEED's guard, on %(done_id)s / %(done_attempt)s) and the
# claim of the next attempt of the same message (CLAIM, unchanged) in one round trip and one commit.
# The two parts are independent: each guard decides for its own row, so a stale outcome (no longer
# STARTED, another attempt) still lets the next attempt be claimed, and a next attempt taken by
# someone else still lets the outcome be written. Sent again after a lost reply, the outcome part
# matches no row (as SUCCEED alone does) and the claim part finds its own claim by its token.
# Always one row: the claim's columns are NULL when nothing was claimed; `done` says whether the
# outcome was written.
SUCCEED_AND_CLAIM = f"""
    WITH succeeded AS (
        UPDATE tasks t SET status = 'SUCCEEDED', updated_at = now(), result = %(result)s, last_error = NULL,
                           finished_at = now()
        WHERE t.id = %(done_id)s AND t.attempt = %(done_attempt)s AND {status_guard("t.status", TaskStatus.STARTED)}
        RETURNING {_OUTCOME}
    ), succeeded_event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, 'STARTED', 'SUCCEEDED', %(done_attempt)s, NULL FROM succeeded
    ), {_CLAIM_PARTS}
    SELECT c.*, s.id IS NOT NULL AS done, s.queue AS done_queue, s.run_sec AS done_run_sec
    FROM (SELECT 1) one
    LEFT JOIN (SELECT * FROM moved UNION ALL SELECT * FROM mine) c ON true
    LEFT JOIN succeeded s ON true
    """


def claim(
    conn: Connection,
    *,
    task_id: uuid.UUID,
    attempt: int,
    worker: str | None = None,
    token: uuid.UUID | None = None,
) -> Claimed | None:
    """ENQUEUED -> STARTED. None when the message is stale (duplicate, cancelled, re-dispatched).

    `token` names this claim: sent again with the same token (its first reply was lost), the claim
    returns the task it already started instead of None. Without one, a fresh token.
    """
    params = {"id": task_id, "attempt": attempt, "detail": worker, "token": token or uuid.uuid4()}
    return _claimed(fetch_row(conn, CLAIM, params))


def _claimed(row: tuple[Any, ...] | None) -> Claimed | None:
    """The claim a CLAIM row (or the first columns of a SUCCEED_AND_CLAIM row) says was made,
    counted in the metrics when it is new; or None. Columns by position: the worker's statements
    are read as plain tuples (`fetch_row`), in the order of _CLAIMED_COLUMNS, lag_sec, fresh."""
    if row is None or row[0] is None:
        return None
    _, name, payload, timeout_sec, max_retries, retry_base_attempt, queue, lag_sec, fresh = row[:9]
    if fresh:
        metrics.transition(TaskStatus.ENQUEUED, TaskStatus.STARTED, queue)
        metrics.DISPATCH_LAG.labels(queue=queue).observe(max(0.0, lag_sec))
    return Claimed(
        name=name,
        payload=payload,
        timeout_sec=timeout_sec,
        max_retries=max_retries,
        retry_base_attempt=retry_base_attempt,
    )


HEARTBEAT = (
    "UPDATE tasks SET heartbeat_at = now()"
    f" WHERE id = %(id)s AND attempt = %(attempt)s AND {status_guard('status', TaskStatus.STARTED)}"
)


def heartbeat(conn: Connection, *, task_id: uuid.UUID, attempt: int) -> bool:
    """Not a transition: refreshes the liveness of a running attempt. False once it was taken away."""
    return conn.exec_driver_sql(HEARTBEAT, {"id": task_id, "attempt": attempt}).rowcount == 1


SUCCEED = _guarded(
    "result = %(result)s, last_error = NULL, finished_at = now()", src=TaskStatus.STARTED, dst=TaskStatus.SUCCEEDED
)


def succeed(conn: Connection, *, task_id: uuid.UUID, attempt: int, result: Any) -> bool:
    # A None result is SQL NULL, not the JSON null.
    params = {"id": task_id, "attempt": attempt, "result": None if result is None else Jsonb(result), "detail": None}
    row = fetch_row(conn, SUCCEED, params)
    if row is None:
        return False
    _, queue, run_sec = row  # _OUTCOME
    _count_outcome(TaskStatus.STARTED, TaskStatus.SUCCEEDED, queue, run_sec)
    return True


def succeed_and_claim(
    conn: Connection,
    *,
    task_id: uuid.UUID,
    attempt: int,
    result: Any,
    next_id: uuid.UUID,
    next_attempt: int,
    worker: str | None,
    token: uuid.UUID,
) -> tuple[bool, Claimed | None]:
    """`succeed` of (task_id, attempt) and `claim` of (next_id, next_attempt) as one statement:
    whether the success was written, and the next attempt's claim (None: stale, as `claim` says).

    The two must be different tasks: one statement cannot change one row twice.
    """
    if next_id == task_id:
        raise ValueError("the outcome and the claim must be of different tasks")
    params = {
        "done_id": task_id,
        "done_attempt": attempt,
        "result": None if result is None else Jsonb(result),
        "id": next_id,
        "attempt": next_attempt,
        "detail": worker,
        "token": token,
    }
    row = fetch_row(conn, SUCCEED_AND_CLAIM, params)
    assert row is not None, "SUCCEED_AND_CLAIM always returns one row"
    done, done_queue, done_run_sec = row[9:12]  # after the 9 columns of the claim
    if done:
        _count_outcome(TaskStatus.STARTED, TaskStatus.SUCCEEDED, done_queue, done_run_sec)
    return bool(done), _claimed(row)


def _count_outcome(src: TaskStatus, dst: TaskStatus, queue: str, run_sec: float) -> None:
    """Count an outcome transition that happened in the metrics: the transition and the run time."""
    metrics.transition(src, dst, queue)
    metrics.observe_run_time(queue, dst.lower(), run_sec)


def _counted(row: Row[Any] | None, src: TaskStatus, dst: TaskStatus) -> bool:
    """Count an outcome transition that happened (row is not None) in the metrics."""
    if row is None:
        return False
    _count_outcome(src, dst, row.queue, row.run_sec)
    return True


FAIL = _guarded(
    "last_error = %(error)s, run_at = now() + make_interval(secs => %(retry_in_sec)s)",
    src=TaskStatus.STARTED,
    dst=TaskStatus.FAILED,
)


def fail(conn: Connection, *, task_id: uuid.UUID, attempt: int, error: str, retry_in_sec: float) -> bool:
    """STARTED -> FAILED, due again after `retry_in_sec`."""
    error = storable_error(error) or ""
    params = {"id": task_id, "attempt": attempt, "error": error, "retry_in_sec": retry_in_sec, "detail": error}
    return _counted(conn.exec_driver_sql(FAIL, params).first(), TaskStatus.STARTED, TaskStatus.FAILED)


KILL = _guarded(
    "last_error = %(error)s, dead_reason = %(reason)s, dlq_recorded = false, finished_at = now(), published_at = now()",
    src=TaskStatus.STARTED,
    dst=TaskStatus.DEAD,
    returning=f"{_OUTCOME}, t.name",
)


def kill(conn: Connection, *, task_id: uuid.UUID, attempt: int, error: str, reason: DlqReason) -> str | None:
    """STARTED -> DEAD; returns the task's name (for the DLQ message the caller publishes), or None."""
    error = storable_error(error) or ""
    detail = storable_error(f"{reason}: {error}")
    params = {"id": task_id, "attempt": attempt, "error": error, "reason": reason.value, "detail": detail}
    row = conn.exec_driver_sql(KILL, params).first()
    if row is None or not _counted(row, TaskStatus.STARTED, TaskStatus.DEAD):
        return None
    return str(row.name)
