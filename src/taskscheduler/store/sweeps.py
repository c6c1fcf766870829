"""The scheduler's statements: dispatch of due tasks, the stuck and lost-message sweeps, retention.

Each works on one bounded batch, takes its rows with `FOR UPDATE SKIP LOCKED` so that several
schedulers share the work without waiting on each other, and takes `now` so that tests travel in
time instead of sleeping.

The scans of the scheduler's loop take a `since`: a lower bound on the run_at (published_at,
started_at) of the rows they must see, which the scheduler keeps between ticks (see
`scheduler.horizons`). A row version that left a status stays in that status's partial index until
vacuum removes it, and while a snapshot is held (a long query, a transaction left open) vacuum can
remove none: a scan from the start of the index walks every such version, each a heap visit, and
so costs more every second. From `since` on it walks only those of the last moments. `since` None:
the full scan, which the scheduler still makes now and then (a row can commit with an older time).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from taskscheduler import metrics
from taskscheduler.lifecycle import MAX_PRIORITY, MIN_PRIORITY, TERMINAL, TaskStatus, queue_for_priority
from taskscheduler.store.sql import NOW, in_list


@dataclass(frozen=True)
class Dispatched:
    id: uuid.UUID
    attempt: int
    queue: str
    timeout_sec: float | None
    # The handler's name, for the message's shadow name (what Flower shows); not part of the message.
    name: str = ""
    # Where the dispatch found it (not part of the message): the scheduler's dispatch horizon.
    priority: int | None = None
    run_at: datetime | None = None


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


# `%(since)s`: a timestamptz[] indexed by priority (1..10), NULL (or an element NULL) for no bound.
_DUE_SINCE = "COALESCE((CAST(%(since)s AS timestamptz[]))[p.priority], '-infinity')"

# PENDING/FAILED -> ENQUEUED for a batch of due tasks. SKIP LOCKED lets several schedulers share the
# work without waiting on each other; the status guard in the UPDATE is belt and braces.
DISPATCH_DUE = f"""
    WITH due AS (
        SELECT d.id, d.status
        FROM unnest(CAST(%(priorities)s AS smallint[])) AS p(priority)
        CROSS JOIN LATERAL (
            SELECT id, status FROM tasks
            WHERE status IN ('PENDING', 'FAILED') AND priority = p.priority
              AND run_at >= {_DUE_SINCE} AND run_at <= {NOW}
            ORDER BY run_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ) d
        LIMIT %(limit)s
    ), moved AS (
        UPDATE tasks t
        SET status = 'ENQUEUED', attempt = t.attempt + 1, published_at = now(), updated_at = now()
        FROM due
        WHERE t.id = due.id AND t.status = due.status
        RETURNING t.id, t.attempt, t.queue, t.priority, t.run_at, t.timeout_sec, t.name, due.status AS from_status
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt)
        SELECT id, from_status, 'ENQUEUED', attempt FROM moved ORDER BY priority DESC, run_at
    )
    SELECT id, attempt, queue, timeout_sec, name, from_status, priority, run_at
    FROM moved ORDER BY priority DESC, run_at
    """


def since_by_priority(since: Mapping[int, datetime] | None) -> list[datetime | None] | None:
    """`%(since)s` of DISPATCH_DUE and SECONDS_UNTIL_NEXT_DUE from {priority: lower bound of run_at}."""
    if since is None:
        return None
    return [since.get(p) for p in range(MIN_PRIORITY, MAX_PRIORITY + 1)]


def dispatch_due(
    conn: Connection,
    *,
    limit: int,
    queue: str | None = None,
    now: datetime | None = None,
    since: Mapping[int, datetime] | None = None,
) -> list[Dispatched]:
    """PENDING/FAILED tasks due at `now` (of `queue`, or of all) -> ENQUEUED, at most `limit`, priority first.

    The batch is taken priority by priority (a queue is a range of priorities), each an index range
    scan of `tasks_due_by_priority_idx` in run_at order that stops once the batch is full: the cost
    is the batch's, however many tasks are due, and an empty queue costs a few index probes.
    `since`: {priority: no task of it due before this is looked for} (see the module's docstring).
    """
    priorities = [p for p in range(MAX_PRIORITY, MIN_PRIORITY - 1, -1) if queue in (None, queue_for_priority(p))]
    params = {"priorities": priorities, "limit": limit, "now": now, "since": since_by_priority(since)}
    rows = conn.exec_driver_sql(DISPATCH_DUE, params).all()
    for r in rows:
        metrics.transition(r.from_status, TaskStatus.ENQUEUED, r.queue)
    return [
        Dispatched(
            id=r.id,
            attempt=r.attempt,
            queue=r.queue,
            timeout_sec=r.timeout_sec,
            name=r.name,
            priority=r.priority,
            run_at=r.run_at,
        )
        for r in rows
    ]


_SINCE = "COALESCE(CAST(%(since)s AS timestamptz), '-infinity')"

# Per queue: how many ENQUEUED, and the oldest published_at; one row even when there is none, with
# the database's clock (the next `since` when nothing waits).
ENQUEUED_PER_QUEUE = f"""
    SELECT array_agg(queue), array_agg(n), min(oldest), now()
    FROM (
        SELECT queue, count(*) AS n, min(published_at) AS oldest FROM tasks
        WHERE status = 'ENQUEUED' AND published_at >= {_SINCE}
        GROUP BY queue
    ) e
    """


@dataclass(frozen=True)
class Enqueued:
    per_queue: dict[str, int]
    # The oldest published_at counted, else the database's now: the next `since`.
    oldest: datetime


def enqueued_counts(conn: Connection, *, since: datetime | None = None) -> Enqueued:
    """How many tasks wait in each queue, published but not yet claimed (from `since` on)."""
    queues, counts, oldest, at = conn.exec_driver_sql(ENQUEUED_PER_QUEUE, {"since": since}).one()
    per_queue = {q: int(n) for q, n in zip(queues or [], counts or [], strict=True)}
    return Enqueued(per_queue=per_queue, oldest=oldest or at)


def enqueued_per_queue(conn: Connection) -> dict[str, int]:
    """How many tasks wait in each queue, published but not yet claimed."""
    return enqueued_counts(conn).per_queue


# The earliest run_at of each priority (from its `since` on): ten probes of tasks_due_by_priority_idx.
NEXT_DUE = f"""
    SELECT p.priority, n.run_at, EXTRACT(EPOCH FROM n.run_at - {NOW})::float8 AS due_in, now() AS at
    FROM generate_series({MIN_PRIORITY}, {MAX_PRIORITY}) AS p(priority)
    LEFT JOIN LATERAL (
        SELECT run_at FROM tasks
        WHERE status IN ('PENDING', 'FAILED') AND priority = p.priority AND run_at >= {_DUE_SINCE}
        ORDER BY run_at LIMIT 1
    ) n ON true
    """
# Kept under its old name: what the benchmarks EXPLAIN.
SECONDS_UNTIL_NEXT_DUE = NEXT_DUE


@dataclass(frozen=True)
class NextDue:
    seconds: float | None  # until the earliest is due (<= 0: due now); None: nothing PENDING/FAILED
    # {priority: its earliest run_at, or the database's now if it has none or that is earlier}: the
    # next `since` (a task created now may be due now).
    earliest: dict[int, datetime]


def next_due(conn: Connection, *, now: datetime | None = None, since: Mapping[int, datetime] | None = None) -> NextDue:
    rows = conn.exec_driver_sql(NEXT_DUE, {"now": now, "since": since_by_priority(since)}).all()
    known = [r.due_in for r in rows if r.due_in is not None]
    return NextDue(
        seconds=float(min(known)) if known else None,
        earliest={int(r.priority): min(r.run_at, r.at) if r.run_at else r.at for r in rows},
    )


def seconds_until_next_due(
    conn: Connection, *, now: datetime | None = None, since: Mapping[int, datetime] | None = None
) -> float | None:
    """Seconds until the earliest PENDING/FAILED task is due (<= 0: due now); None if there is none."""
    return next_due(conn, now=now, since=since).seconds


# The oldest STARTED task's started_at (from `since` on), else the database's now: the next `since`
# of the stuck sweep.
OLDEST_STARTED = f"""
    SELECT COALESCE(min(started_at), now()) FROM tasks WHERE status = 'STARTED' AND started_at >= {_SINCE}
    """


def oldest_started(conn: Connection, *, since: datetime | None = None) -> datetime:
    value: datetime = conn.exec_driver_sql(OLDEST_STARTED, {"since": since}).scalar_one()
    return value


# Heartbeat silence counts from the latest of: the last heartbeat; when this scheduler's connection
# to the database last came back (`reconnected_at`, its start included); when the database server
# started. While the database was unreachable no worker could write a heartbeat, so that silence says
# nothing about the workers. The postmaster's start covers a restart that this scheduler did not see
# (it started later); its own reconnection covers a failover to a replica (which keeps its older
# start time) and a network outage (which leaves the server running).
_SILENT_SINCE = "GREATEST(heartbeat_at, CAST(%(reconnected_at)s AS timestamptz), pg_postmaster_start_time())"

LOCK_STUCK = f"""
    SELECT id, attempt, max_retries, retry_base_attempt,
           {_SILENT_SINCE} < {NOW} - make_interval(secs => %(heartbeat_timeout_sec)s) AS by_heartbeat
    FROM tasks
    WHERE status = 'STARTED' AND started_at >= {_SINCE}
      AND ({_SILENT_SINCE} < {NOW} - make_interval(secs => %(heartbeat_timeout_sec)s)
           OR started_at < {NOW} - make_interval(secs => COALESCE(timeout_sec, %(default_timeout_sec)s)))
    ORDER BY started_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
    """


def lock_stuck(
    conn: Connection,
    *,
    heartbeat_timeout_sec: float,
    default_timeout_sec: float,
    limit: int,
    reconnected_at: datetime | None = None,
    now: datetime | None = None,
    since: datetime | None = None,
) -> list[Started]:
    """STARTED tasks whose worker went silent or that ran past their timeout, locked for this transaction.

    Silent means no heartbeat for `heartbeat_timeout_sec` counted from the last heartbeat, but never
    from before `reconnected_at` (when the caller last regained the database) or the database
    server's start: a heartbeat missed while the database was away is not a dead worker.
    """
    params = {
        "now": now,
        "heartbeat_timeout_sec": heartbeat_timeout_sec,
        "default_timeout_sec": default_timeout_sec,
        "reconnected_at": reconnected_at,
        "limit": limit,
        "since": since,
    }
    return [
        Started(
            id=r.id,
            attempt=r.attempt,
            max_retries=r.max_retries,
            retry_base_attempt=r.retry_base_attempt,
            by_heartbeat=bool(r.by_heartbeat),
        )
        for r in conn.exec_driver_sql(LOCK_STUCK, params)
    ]


# A lost message is published again only while the broker holds fewer messages for the queue than
# the queue has unclaimed tasks (`waiting`, read from the broker just before): with the queue's
# workers away the messages wait there, and publishing them again every ENQUEUE_TIMEOUT_SEC would
# only pile up duplicates. The budget is counted in the statement, with the sweep.
REPUBLISH_LOST_ENQUEUED = f"""
    WITH lost AS (
        SELECT id FROM tasks
        WHERE status = 'ENQUEUED' AND queue = %(queue)s
          AND published_at >= {_SINCE} AND published_at < {NOW} - make_interval(secs => %(timeout_sec)s)
        ORDER BY published_at
        LIMIT GREATEST(0, LEAST(%(limit)s,
            (SELECT count(*) FROM tasks
             WHERE status = 'ENQUEUED' AND queue = %(queue)s AND published_at >= {_SINCE}) - %(waiting)s))
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t SET published_at = {NOW}
    FROM lost WHERE t.id = lost.id AND t.status = 'ENQUEUED'
    RETURNING t.id, t.attempt, t.queue, t.timeout_sec, t.name
    """


def take_lost_enqueued(
    conn: Connection,
    *,
    queue: str,
    timeout_sec: float,
    limit: int,
    waiting: int = 0,
    now: datetime | None = None,
    since: datetime | None = None,
) -> list[Dispatched]:
    """ENQUEUED tasks of `queue` unclaimed for `timeout_sec`; marks them published again (same attempt).

    At most as many as the queue has unclaimed tasks beyond the `waiting` messages the broker holds
    for it, so that the broker never holds more messages for a queue than it has unclaimed tasks.
    """
    params = {
        "now": now,
        "queue": queue,
        "timeout_sec": timeout_sec,
        "limit": limit,
        "waiting": waiting,
        "since": since,
    }
    rows = conn.exec_driver_sql(REPUBLISH_LOST_ENQUEUED, params)
    return [Dispatched(id=r.id, attempt=r.attempt, queue=r.queue, timeout_sec=r.timeout_sec, name=r.name) for r in rows]


# As for lost task messages: one DLQ message per DEAD task still waiting in the broker is enough.
REPUBLISH_UNRECORDED_DEAD = f"""
    WITH lost AS (
        SELECT id FROM tasks
        WHERE status = 'DEAD' AND NOT dlq_recorded
          AND published_at < {NOW} - make_interval(secs => %(timeout_sec)s)
        ORDER BY published_at
        LIMIT GREATEST(0, LEAST(%(limit)s,
            (SELECT count(*) FROM tasks WHERE status = 'DEAD' AND NOT dlq_recorded) - %(waiting)s))
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t SET published_at = {NOW}
    FROM lost WHERE t.id = lost.id AND t.status = 'DEAD'
    RETURNING t.id, t.attempt, t.name, t.dead_reason, t.last_error
    """


def take_unrecorded_dead(
    conn: Connection, *, timeout_sec: float, limit: int, waiting: int = 0, now: datetime | None = None
) -> list[DeadUnrecorded]:
    """DEAD tasks whose DLQ record has not appeared within `timeout_sec`; marks them published again.

    At most as many as there are such tasks beyond the `waiting` messages the DLQ queue holds: with
    the DLQ worker down, each DEAD task has one message waiting and none is published again.
    """
    params = {"now": now, "timeout_sec": timeout_sec, "limit": limit, "waiting": waiting}
    rows = conn.exec_driver_sql(REPUBLISH_UNRECORDED_DEAD, params)
    return [
        DeadUnrecorded(id=r.id, attempt=r.attempt, name=r.name, reason=r.dead_reason, error=r.last_error) for r in rows
    ]


# --- retention ----------------------------------------------------------------------------------------------------

DELETE_FINISHED = f"""
    WITH old AS (
        SELECT id FROM tasks
        WHERE status IN ({in_list(TERMINAL)})
          AND finished_at < {NOW} - make_interval(secs => %(older_than_sec)s)
          AND (status <> 'DEAD' OR dlq_recorded)
        ORDER BY finished_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM tasks t USING old
    WHERE t.id = old.id AND t.status IN ({in_list(TERMINAL)}) AND (t.status <> 'DEAD' OR t.dlq_recorded)
    """


def delete_finished(conn: Connection, *, older_than_sec: float, limit: int, now: datetime | None = None) -> int:
    """Delete up to `limit` SUCCEEDED, DEAD or CANCELLED tasks finished more than `older_than_sec` ago, and
    their events (ON DELETE CASCADE). Not a transition: the task is gone. Returns how many.

    A DEAD task whose `dlq_events` row is not written yet is kept: the sweep still owes it its DLQ
    message, and deleting it would lose the only record that it died."""
    params = {"older_than_sec": older_than_sec, "limit": limit, "now": now}
    return conn.exec_driver_sql(DELETE_FINISHED, params).rowcount
