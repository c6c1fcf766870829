"""Reads for the dashboard and for `explain`: each statement a named constant, none a count over the table.

Every read is bounded whatever the table holds: counts stop at a cap (index-only scans of
`tasks_status_created_idx`) and above it come from the planner's estimate (`pg_class` and
`pg_stats`, as `ANALYZE` left them); the last hour's charts read at most RECENT_CAP of the newest
finished tasks (`tasks_finished_idx`); lists are keyset pages. Statements use psycopg's `%(name)s`
parameters and run with `Connection.exec_driver_sql`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping

from taskscheduler import explain
from taskscheduler.lifecycle import MAX_PRIORITY, MIN_PRIORITY, TASK_QUEUES, TERMINAL, TaskStatus, queue_for_priority

# A status with more tasks than this is counted by estimate (shown as such).
EXACT_COUNT_CAP = 2_000
# The charts of the last hour read at most this many of the newest finished tasks.
RECENT_CAP = 5_000
# The explanation counts the due tasks ahead of a task up to this many.
DUE_AHEAD_CAP = 10_000

# --- counts by status and queue -----------------------------------------------------------------------------------

# How many tasks are in each status, but for each at most %(cap)s: an index-only scan of at most that
# many entries of tasks_status_created_idx per status.
COUNT_BY_STATUS_CAPPED = """
    SELECT s.status,
           (SELECT count(*) FROM (SELECT 1 FROM tasks t WHERE t.status = s.status LIMIT %(cap)s) c) AS n
    FROM unnest(CAST(%(statuses)s AS text[])) AS s(status)
    """

# The exact split by queue of statuses known to hold few tasks.
COUNT_BY_STATUS_AND_QUEUE = """
    SELECT status, queue, count(*) AS n FROM tasks WHERE status = ANY(%(statuses)s) GROUP BY status, queue
    """

# The planner's estimate of the tasks in a status and queue: pg_class's size of the table times the
# selectivity pg_stats gives the two conditions. Costs a plan, reads no row.
ESTIMATE_STATUS_QUEUE = "EXPLAIN (FORMAT JSON) SELECT 1 FROM tasks WHERE status = %(status)s AND queue = %(queue)s"


@dataclass(frozen=True)
class Count:
    n: int
    exact: bool


@dataclass(frozen=True)
class StatusCounts:
    """Tasks by status and queue now; counts above EXACT_COUNT_CAP are estimates."""

    cells: dict[tuple[str, str], Count]  # (status, queue) -> count
    totals: dict[str, Count]  # status -> count over the queues


def status_counts(conn: Connection, *, cap: int = EXACT_COUNT_CAP) -> StatusCounts:
    statuses = [s.value for s in TaskStatus]
    queues = [q.value for q in TASK_QUEUES]
    capped = {
        row.status: int(row.n)
        for row in conn.exec_driver_sql(COUNT_BY_STATUS_CAPPED, {"statuses": statuses, "cap": cap + 1})
    }
    small = [s for s in statuses if capped[s] <= cap]
    cells: dict[tuple[str, str], Count] = {(s, q): Count(0, True) for s in small for q in queues}
    if small:
        for row in conn.exec_driver_sql(COUNT_BY_STATUS_AND_QUEUE, {"statuses": small}):
            cells[(row.status, row.queue)] = Count(int(row.n), True)
    totals = {s: Count(capped[s], True) for s in small}
    for status in statuses:
        if status in totals:
            continue
        for queue in queues:
            # An estimate below the cap would contradict what was counted: the status has more.
            cells[(status, queue)] = Count(_estimate(conn, status, queue), False)
        totals[status] = Count(max(cap + 1, sum(cells[(status, q)].n for q in queues)), False)
    return StatusCounts(cells=cells, totals=totals)


def _estimate(conn: Connection, status: str, queue: str) -> int:
    (doc,) = conn.exec_driver_sql(ESTIMATE_STATUS_QUEUE, {"status": status, "queue": queue}).one()
    plan = json.loads(doc) if isinstance(doc, str) else doc
    return int(plan[0]["Plan"]["Plan Rows"])


# --- the last hour ------------------------------------------------------------------------------------------------

# Of the newest finished tasks (at most %(cap)s) of the last hour, per minute and queue, per queue, and
# in all: how many finished, and the dispatch lag (started_at - run_at) of those that ran. One read of
# the rows for the three groupings. With the cap reached, the minutes before the oldest row read are
# not counted: `oldest` (of the grand total) says where the count begins.
RECENT_FINISHED = f"""
    WITH recent AS (
        SELECT finished_at, queue, EXTRACT(EPOCH FROM started_at - run_at)::float8 AS lag_sec
        FROM tasks
        WHERE status IN ({", ".join(f"'{s.value}'" for s in sorted(TERMINAL))}) AND finished_at >= %(since)s
        ORDER BY finished_at DESC
        LIMIT %(cap)s
    )
    SELECT date_bin('1 minute', finished_at, %(since)s) AS minute, queue, count(*) AS finished,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY lag_sec) AS lag_p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY lag_sec) AS lag_p95,
           min(finished_at) AS oldest,
           GROUPING(date_bin('1 minute', finished_at, %(since)s), queue) AS grouping
    FROM recent
    GROUP BY GROUPING SETS ((1, 2), (2), ())
    ORDER BY 1, 2
    """


@dataclass(frozen=True)
class MinuteStats:
    minute: datetime
    queue: str
    finished: int
    lag_p50: float | None
    lag_p95: float | None


@dataclass(frozen=True)
class QueueLag:
    queue: str
    finished: int
    lag_p50: float | None
    lag_p95: float | None


@dataclass(frozen=True)
class RecentActivity:
    since: datetime
    now: datetime
    minutes: list[MinuteStats]
    by_queue: dict[str, QueueLag]
    # Set when RECENT_CAP was reached: minutes before it were not read.
    counted_from: datetime | None


def recent_activity(conn: Connection, *, now: datetime, since: datetime, cap: int = RECENT_CAP) -> RecentActivity:
    minutes: list[MinuteStats] = []
    by_queue: dict[str, QueueLag] = {}
    read, oldest = 0, None
    for r in conn.exec_driver_sql(RECENT_FINISHED, {"since": since, "cap": cap}):
        if r.grouping == 0:  # a minute of a queue
            minutes.append(MinuteStats(r.minute, r.queue, int(r.finished), r.lag_p50, r.lag_p95))
        elif r.grouping == 2:  # a queue over the hour (the minute rolled up)
            by_queue[r.queue] = QueueLag(r.queue, int(r.finished), r.lag_p50, r.lag_p95)
        else:  # everything read
            read, oldest = int(r.finished), r.oldest
    counted_from = oldest if read >= cap else None
    return RecentActivity(since=since, now=now, minutes=minutes, by_queue=by_queue, counted_from=counted_from)


# --- processes ----------------------------------------------------------------------------------------------------

PROCESSES = """
    SELECT id, role, hostname, pid, detail, started_at, seen_at,
           EXTRACT(EPOCH FROM now() - seen_at)::float8 AS age_sec,
           seen_at < now() - make_interval(secs => %(stale_after_sec)s) AS stale
    FROM process_heartbeats
    ORDER BY role, hostname, pid
    """


def processes(conn: Connection, *, stale_after_sec: float) -> list[RowMapping]:
    return list(conn.exec_driver_sql(PROCESSES, {"stale_after_sec": stale_after_sec}).mappings())


DATABASE_NOW = "SELECT now()"


def database_now(conn: Connection) -> datetime:
    value: datetime = conn.exec_driver_sql(DATABASE_NOW).scalar_one()
    return value


# Reads on a page stop after this long: a filter the indexes cannot serve gets an error, not a stuck page.
STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', %(ms)s, true)"


def limit_statement_time(conn: Connection, seconds: float) -> None:
    conn.exec_driver_sql(STATEMENT_TIMEOUT, {"ms": str(max(1, round(seconds * 1000)))})


# --- dead letters -------------------------------------------------------------------------------------------------

# The newest first, a keyset page before (%(before_created_at)s, %(before_id)s); the first page passes
# 'infinity'. With the task's status now, which says whether it can still be retried.
DLQ_PAGE = """
    SELECT d.id, d.task_id, d.task_name, d.attempt, d.reason, d.error, d.created_at, t.status AS task_status
    FROM dlq_events d LEFT JOIN tasks t ON t.id = d.task_id
    WHERE (d.created_at, d.id) < (CAST(%(before_created_at)s AS timestamptz), %(before_id)s)
      AND (CAST(%(name)s AS text) IS NULL OR d.task_name = %(name)s)
      AND (CAST(%(reason)s AS text) IS NULL OR d.reason = %(reason)s)
      AND (CAST(%(since)s AS timestamptz) IS NULL OR d.created_at >= %(since)s)
    ORDER BY d.created_at DESC, d.id DESC
    LIMIT %(limit)s
    """

FIRST_PAGE = "infinity"


@dataclass(frozen=True)
class DeadFilter:
    """DEAD tasks as `POST /dlq/retry` selects them: by name, DLQ reason, finished at or after `since`."""

    name: str | None = None
    reason: str | None = None
    since: datetime | None = None


def dlq_page(
    conn: Connection, where: DeadFilter, *, limit: int, before: tuple[datetime, int] | None = None
) -> list[RowMapping]:
    params: dict[str, Any] = {
        "name": where.name,
        "reason": where.reason,
        "since": where.since,
        "limit": limit,
        "before_created_at": FIRST_PAGE if before is None else before[0],
        "before_id": 2**63 - 1 if before is None else before[1],
    }
    return list(conn.exec_driver_sql(DLQ_PAGE, params).mappings())


# The DEAD tasks a bulk retry with this filter would move now (the same conditions as
# operations.RETRY_DEAD); `until` is the database's time when the count was taken.
COUNT_DEAD_MATCHING = """
    SELECT count(*) FROM tasks
    WHERE status = 'DEAD'
      AND (CAST(%(name)s AS text) IS NULL OR name = %(name)s)
      AND (CAST(%(reason)s AS text) IS NULL OR dead_reason = %(reason)s)
      AND (CAST(%(since)s AS timestamptz) IS NULL OR finished_at >= %(since)s)
      AND finished_at <= %(until)s
    """


def count_dead_matching(conn: Connection, where: DeadFilter, *, until: datetime) -> int:
    params = {"name": where.name, "reason": where.reason, "since": where.since, "until": until}
    return int(conn.exec_driver_sql(COUNT_DEAD_MATCHING, params).scalar_one())


# The newest dead letters, with their task's status now.
NEWEST_DEAD = """
    SELECT d.task_id, d.task_name, d.attempt, d.reason, d.error, d.created_at, t.status AS task_status
    FROM dlq_events d LEFT JOIN tasks t ON t.id = d.task_id
    ORDER BY d.created_at DESC, d.id DESC
    LIMIT %(limit)s
    """


def newest_dead(conn: Connection, *, limit: int) -> list[RowMapping]:
    return list(conn.exec_driver_sql(NEWEST_DEAD, {"limit": limit}).mappings())


# --- what explain needs -------------------------------------------------------------------------------------------

# The queue's unclaimed tasks (ENQUEUED: tasks_enqueued_idx, bounded by back-pressure) and the live
# processes that serve it, on the database's clock.
QUEUE_FACTS = """
    SELECT now() AS now,
           (SELECT count(*) FROM tasks WHERE status = 'ENQUEUED' AND queue = %(queue)s) AS unclaimed,
           (SELECT count(*) FROM process_heartbeats
            WHERE role = 'worker' AND %(queue)s = ANY(string_to_array(detail, ','))
              AND seen_at >= now() - make_interval(secs => %(stale_after_sec)s)) AS live_workers,
           (SELECT count(*) FROM process_heartbeats
            WHERE role = 'scheduler' AND seen_at >= now() - make_interval(secs => %(stale_after_sec)s))
           AS live_schedulers
    """

# Due tasks of the queue that a dispatch takes before the given one (a higher priority, or the same
# priority and an earlier run_at), at most %(cap)s: probes of tasks_due_by_priority_idx.
DUE_AHEAD = """
    SELECT count(*) FROM (
        SELECT 1 FROM tasks
        WHERE status IN ('PENDING', 'FAILED') AND priority = ANY(%(priorities)s) AND run_at <= now()
          AND (priority > %(priority)s OR (priority = %(priority)s AND run_at < %(run_at)s))
          AND id <> %(id)s
        LIMIT %(cap)s
    ) ahead
    """


def queue_facts(
    conn: Connection,
    task: RowMapping | dict[str, Any],
    *,
    max_enqueued: int,
    refill_at: int,
    stale_after_sec: float,
    enqueue_timeout_sec: float,
) -> explain.QueueFacts:
    """What `explain.explain` needs to know about `task`'s queue now."""
    queue = task["queue"]
    row = conn.exec_driver_sql(QUEUE_FACTS, {"queue": queue, "stale_after_sec": stale_after_sec}).one()
    due_ahead = 0
    if task["status"] in (TaskStatus.PENDING, TaskStatus.FAILED) and task["run_at"] <= row.now:
        priorities = [p for p in range(MIN_PRIORITY, MAX_PRIORITY + 1) if queue_for_priority(p).value == queue]
        params = {
            "priorities": priorities,
            "priority": task["priority"],
            "run_at": task["run_at"],
            "id": task["id"],
            "cap": DUE_AHEAD_CAP,
        }
        due_ahead = int(conn.exec_driver_sql(DUE_AHEAD, params).scalar_one())
    return explain.QueueFacts(
        now=row.now,
        queue=queue,
        unclaimed=int(row.unclaimed),
        max_enqueued=max_enqueued,
        refill_at=refill_at,
        live_workers=int(row.live_workers),
        live_schedulers=int(row.live_schedulers),
        stale_after_sec=stale_after_sec,
        enqueue_timeout_sec=enqueue_timeout_sec,
        due_ahead=due_ahead,
        due_ahead_cap=DUE_AHEAD_CAP,
    )
