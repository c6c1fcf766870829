"""Firing schedules: lock the due ones, create a task per fire time, advance them.

The tasks a schedule creates are inserted by `CREATE_FIRED_TASKS`, which does what the normal create
does (its 'created' event, the NOTIFY for a task due now) and adds the schedule's fire time, on which a
unique index makes one task per fire time: a second scheduler, a crash between insert and advance, or a
backfill meeting a live fire inserts nothing the second time. Statements are public `%(name)s` constants.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, RowMapping

from taskscheduler import metrics
from taskscheduler.lifecycle import queue_for_priority
from taskscheduler.schedule_spec import jitter_sec
from taskscheduler.store.creation import NOTIFY_DUE
from taskscheduler.store.schedules import UNFINISHED, database_now, run
from taskscheduler.store.sql import NOW

# Due schedules, oldest fire first, each with whether a task of it is unfinished (for the overlap
# policy; a probe of tasks_schedule_unfinished_idx). SKIP LOCKED: several schedulers share the batch.
LOCK_DUE = f"""
    SELECT s.*, {NOW} AS db_now,
           EXISTS (SELECT 1 FROM tasks t WHERE t.schedule_id = s.id AND t.{UNFINISHED}) AS busy
    FROM schedules s
    WHERE NOT s.paused AND s.next_fire_at <= {NOW}
    ORDER BY s.next_fire_at
    LIMIT %(limit)s
    FOR UPDATE OF s SKIP LOCKED
    """

# overlap=buffer_one: schedules whose waiting fire can go now (their task has finished) and that are
# not due anyway (LOCK_DUE takes those).
LOCK_BUFFERED_READY = f"""
    SELECT s.*, {NOW} AS db_now, false AS busy
    FROM schedules s
    WHERE NOT s.paused AND s.buffered_for IS NOT NULL AND NOT (s.next_fire_at <= {NOW}) IS TRUE
      -- OFFSET 0 keeps this a probe of tasks_schedule_unfinished_idx per schedule: as an anti join
      -- the planner may scan that index whole for each one.
      AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.schedule_id = s.id AND t.{UNFINISHED} OFFSET 0)
    ORDER BY s.buffered_for
    LIMIT %(limit)s
    FOR UPDATE OF s SKIP LOCKED
    """

# The tasks of many fires, in one statement, from the schedules' rows (locked by the caller). As the
# normal create: PENDING, a 'created' event, and a NOTIFY when one is due now.
CREATE_FIRED_TASKS = f"""
    WITH input AS (
        SELECT * FROM jsonb_to_recordset(%(rows)s) AS r(
            id uuid, schedule_id uuid, scheduled_for timestamptz, run_at timestamptz, queue text, ord integer)
    ), created AS (
        INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries, timeout_sec,
                           schedule_id, scheduled_for)
        SELECT i.id, s.task, s.payload, s.priority, i.queue, 'PENDING', i.run_at, s.max_retries, s.timeout_sec,
               i.schedule_id, i.scheduled_for
        FROM input i JOIN schedules s ON s.id = i.schedule_id
        ORDER BY i.ord
        ON CONFLICT (schedule_id, scheduled_for) WHERE schedule_id IS NOT NULL DO NOTHING
        RETURNING id, schedule_id, scheduled_for, queue, run_at, created_at
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, NULL, 'PENDING', 0, 'created by schedule' FROM created
    ), due AS (
        {NOTIFY_DUE}
    )
    SELECT created.id, created.schedule_id, created.scheduled_for, created.queue
    FROM created LEFT JOIN due ON true
    """

# After a tick: where each schedule goes on, and what it fired, skipped and missed.
ADVANCE_SCHEDULES = """
    UPDATE schedules s SET
        next_fire_at = u.next_fire_at,
        buffered_for = u.buffered_for,
        last_fire_at = GREATEST(s.last_fire_at, u.last_fire_at),
        fires = s.fires + u.fired,
        skips = s.skips + u.skipped,
        misses = s.misses + u.missed,
        last_skipped_at = COALESCE(u.last_skipped_at, s.last_skipped_at),
        last_skip_reason = COALESCE(u.last_skip_reason, s.last_skip_reason)
    FROM jsonb_to_recordset(%(rows)s) AS u(
        id uuid, next_fire_at timestamptz, buffered_for timestamptz, last_fire_at timestamptz, fired bigint,
        skipped bigint, missed bigint, last_skipped_at timestamptz, last_skip_reason text)
    WHERE s.id = u.id
    """

# Tasks made on request (trigger, backfill) count as fires too.
COUNT_FIRES = "UPDATE schedules SET fires = fires + %(n)s WHERE id = %(id)s"

# Which of these fire times of a schedule have a task already (backfill).
FIRED_AMONG = """
    SELECT scheduled_for FROM tasks WHERE schedule_id = %(id)s AND scheduled_for = ANY(%(times)s)
    """

# Seconds until the earliest fire of a schedule that is not paused (<= 0: due now); the loop's sleep.
SECONDS_UNTIL_NEXT_FIRE = f"""
    SELECT EXTRACT(EPOCH FROM min(next_fire_at) - {NOW})::float8 FROM schedules WHERE NOT paused
    """


# --- firing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fire:
    """A task to create for `schedule_id` at fire time `scheduled_for`, due at `run_at` (jitter added)."""

    schedule_id: uuid.UUID
    scheduled_for: datetime
    run_at: datetime
    priority: int


def fire_of(row: Mapping[Any, Any], fire_time: datetime) -> Fire:
    """The task of the schedule `row` for `fire_time`: due at the fire time plus its jitter."""
    delay = timedelta(seconds=jitter_sec(row["id"], fire_time, row["jitter_sec"]))
    return Fire(schedule_id=row["id"], scheduled_for=fire_time, run_at=fire_time + delay, priority=row["priority"])


@dataclass(frozen=True)
class Created:
    """A task created for a fire."""

    id: uuid.UUID
    schedule_id: uuid.UUID
    scheduled_for: datetime


@dataclass(frozen=True)
class Advance:
    """What a tick did to one schedule, written back by `advance`."""

    id: uuid.UUID
    next_fire_at: datetime | None
    buffered_for: datetime | None
    last_fire_at: datetime | None
    fired: int
    skipped: int
    missed: int
    last_skipped_at: datetime | None
    last_skip_reason: str | None


def lock_due(conn: Connection, *, limit: int, now: datetime | None = None) -> list[RowMapping]:
    """Up to `limit` schedules to fire now, locked for this transaction: those due, then those whose
    buffered fire may go. Each row has `db_now` (the clock every decision uses) and `busy`."""
    params = {"now": now, "limit": limit}
    rows = list(run(conn, LOCK_DUE, params).mappings())
    if len(rows) < limit:
        params["limit"] = limit - len(rows)
        rows += list(run(conn, LOCK_BUFFERED_READY, params).mappings())
    return rows


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def create_fired_tasks(conn: Connection, fires: Sequence[Fire]) -> list[Created]:
    """Create a PENDING task per fire, from its schedule's row; a fire that has its task already is
    skipped. Returns the tasks created."""
    if not fires:
        return []
    rows = [
        {
            "id": str(uuid.uuid4()),
            "schedule_id": str(f.schedule_id),
            "scheduled_for": _iso(f.scheduled_for),
            "run_at": _iso(f.run_at),
            "queue": queue_for_priority(f.priority).value,
            "ord": i,
        }
        for i, f in enumerate(fires)
    ]
    created = list(run(conn, CREATE_FIRED_TASKS, {"rows": Jsonb(rows)}))
    for queue, n in Counter(r.queue for r in created).items():
        metrics.TASKS_CREATED.labels(queue=queue).inc(n)
    return [Created(id=r.id, schedule_id=r.schedule_id, scheduled_for=r.scheduled_for) for r in created]


def advance(conn: Connection, advances: Sequence[Advance]) -> None:
    if not advances:
        return
    rows = [
        {
            "id": str(a.id),
            "next_fire_at": _iso(a.next_fire_at),
            "buffered_for": _iso(a.buffered_for),
            "last_fire_at": _iso(a.last_fire_at),
            "fired": a.fired,
            "skipped": a.skipped,
            "missed": a.missed,
            "last_skipped_at": _iso(a.last_skipped_at),
            "last_skip_reason": a.last_skip_reason,
        }
        for a in advances
    ]
    run(conn, ADVANCE_SCHEDULES, {"rows": Jsonb(rows)})


def count_fires(conn: Connection, schedule_id: uuid.UUID, n: int) -> None:
    if n:
        run(conn, COUNT_FIRES, {"id": schedule_id, "n": n})


def trigger(conn: Connection, row: Mapping[Any, Any]) -> Created | None:
    """One task of the schedule `row` (locked by the caller) due now, as a fire at this moment would
    make it (paused or not, whatever the overlap), counted as a fire. None when a task for this very
    moment exists already."""
    now = database_now(conn)
    fire = Fire(schedule_id=row["id"], scheduled_for=now, run_at=now, priority=row["priority"])
    created = create_fired_tasks(conn, [fire])
    count_fires(conn, row["id"], len(created))
    return created[0] if created else None


def fired_among(conn: Connection, schedule_id: uuid.UUID, times: Sequence[datetime]) -> set[datetime]:
    """Those of `times` for which the schedule has a task."""
    rows = run(conn, FIRED_AMONG, {"id": schedule_id, "times": list(times)})
    return {r.scheduled_for for r in rows}


def seconds_until_next_fire(conn: Connection, *, now: datetime | None = None) -> float | None:
    value = run(conn, SECONDS_UNTIL_NEXT_FIRE, {"now": now}).scalar_one()
    return None if value is None else float(value)
