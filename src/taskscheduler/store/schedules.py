"""Recurring schedules: every statement on the `schedules` table, and the creation of their tasks.

Each statement is a public constant in psycopg's `%(name)s` style, run with `exec_driver_sql`, so that
it can be read and EXPLAINed by its name. A schedule's own row (next_fire_at, counters) is written
here only. The tasks a schedule creates are inserted by `CREATE_FIRED_TASKS`, which does what the
normal create does (its 'created' event, the NOTIFY for a task due now) and adds the schedule's
fire time, on which a unique index makes one task per fire time: a second scheduler, a crash
between insert and advance, or a backfill meeting a live fire inserts nothing the second time.
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
from taskscheduler.schedule_spec import Overlap, Spec, interval_anchor, jitter_sec
from taskscheduler.store.creation import DUE_CHANNEL
from taskscheduler.store.operations import TASK_COUNTS_TIMEOUT
from taskscheduler.store.sql import NOW

UNFINISHED = "status NOT IN ('SUCCEEDED', 'DEAD', 'CANCELLED')"
# What a change of a schedule can set; the rest is the scheduler's (next_fire_at, counters).
SETTABLE = (
    "name", "task", "payload", "priority", "max_retries", "timeout_sec", "cron", "every_sec", "timezone",
    "start_at", "end_at", "jitter_sec", "overlap", "catchup_window_sec", "paused", "note",
)  # fmt: skip
# The note of a code schedule no longer declared in code; declared again, it is resumed.
REMOVED_FROM_CODE = "paused: no longer declared in code (TASK_MODULES)"
# Several schedulers upsert the code schedules at start: one at a time.
CODE_SYNC_LOCK_ID = 7_412_093_119

CLOCK = f"SELECT {NOW}"

INSERT_SCHEDULE = """
    INSERT INTO schedules (id, name, task, payload, priority, max_retries, timeout_sec, cron, every_sec, timezone,
                           start_at, end_at, jitter_sec, overlap, catchup_window_sec, paused, note, source,
                           next_fire_at, created_at, updated_at)
    VALUES (%(id)s, %(name)s, %(task)s, %(payload)s, %(priority)s, %(max_retries)s, %(timeout_sec)s, %(cron)s,
            %(every_sec)s, %(timezone)s, %(start_at)s, %(end_at)s, %(jitter_sec)s, %(overlap)s,
            %(catchup_window_sec)s, %(paused)s, %(note)s, %(source)s, %(next_fire_at)s, %(now)s, %(now)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING *
    """

SCHEDULE_BY_ID = "SELECT * FROM schedules WHERE id = %(id)s"
SCHEDULE_BY_NAME = "SELECT * FROM schedules WHERE name = %(name)s"
LOCK_SCHEDULE_BY_ID = "SELECT * FROM schedules WHERE id = %(id)s FOR UPDATE"
LOCK_SCHEDULE_BY_NAME = "SELECT * FROM schedules WHERE name = %(name)s FOR UPDATE"

# By name, a page after the name `after` (keyset: a page never shifts).
LIST_SCHEDULES = """
    SELECT * FROM schedules
    WHERE (CAST(%(after)s AS text) IS NULL OR name > %(after)s)
      AND (CAST(%(source)s AS text) IS NULL OR source = %(source)s)
    ORDER BY name
    LIMIT %(limit)s
    """

UPDATE_SCHEDULE = """
    UPDATE schedules SET name = %(name)s, task = %(task)s, payload = %(payload)s, priority = %(priority)s,
        max_retries = %(max_retries)s, timeout_sec = %(timeout_sec)s, cron = %(cron)s, every_sec = %(every_sec)s,
        timezone = %(timezone)s, start_at = %(start_at)s, end_at = %(end_at)s, jitter_sec = %(jitter_sec)s,
        overlap = %(overlap)s, catchup_window_sec = %(catchup_window_sec)s, paused = %(paused)s, note = %(note)s,
        source = %(source)s, next_fire_at = %(next_fire_at)s, buffered_for = %(buffered_for)s, updated_at = now()
    WHERE id = %(id)s
    RETURNING *
    """

DELETE_SCHEDULE = "DELETE FROM schedules WHERE id = %(id)s"

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
        SELECT pg_notify('{DUE_CHANNEL}', '') FROM created WHERE run_at <= created_at LIMIT 1
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

PAUSE_SCHEDULE = """
    UPDATE schedules SET paused = true, note = %(note)s, updated_at = now() WHERE id = %(id)s RETURNING *
    """

# From the first fire time after now: what fell due while paused is neither run nor counted missed.
RESUME_SCHEDULE = """
    UPDATE schedules SET paused = false, note = NULL, next_fire_at = %(next_fire_at)s, buffered_for = NULL,
        updated_at = now()
    WHERE id = %(id)s
    RETURNING *
    """

# Which of these fire times of a schedule have a task already (backfill).
FIRED_AMONG = """
    SELECT scheduled_for FROM tasks WHERE schedule_id = %(id)s AND scheduled_for = ANY(%(times)s)
    """

# Seconds until the earliest fire of a schedule that is not paused (<= 0: due now); the loop's sleep.
SECONDS_UNTIL_NEXT_FIRE = f"""
    SELECT EXTRACT(EPOCH FROM min(next_fire_at) - {NOW})::float8 FROM schedules WHERE NOT paused
    """

LOCK_CODE_SYNC = f"SELECT pg_advisory_xact_lock({CODE_SYNC_LOCK_ID})"

PAUSE_UNDECLARED = """
    UPDATE schedules SET paused = true, note = %(note)s, updated_at = now()
    WHERE source = 'code' AND NOT (name = ANY(%(names)s)) AND NOT paused
    RETURNING name
    """

# For /metrics: each schedule's counters.
SCHEDULE_COUNTERS = "SELECT name, fires, skips, misses FROM schedules ORDER BY name"


class ScheduleNameTaken(Exception):
    """A schedule with this name exists already."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a schedule named {name!r} exists already")
        self.name = name


def _run(conn: Connection, sql: str, params: Mapping[Any, Any] | None = None) -> Any:
    return conn.exec_driver_sql(sql, dict(params or {}))


def database_now(conn: Connection, now: datetime | None = None) -> datetime:
    value: datetime = _run(conn, CLOCK, {"now": now}).scalar_one()
    return value


def spec_of(row: Mapping[Any, Any]) -> Spec:
    """When the schedule `row` (or the fields of one to be, with its `created_at`) fires."""
    return Spec(
        cron=row.get("cron"),
        every_sec=row.get("every_sec"),
        timezone=row.get("timezone") or "UTC",
        start_at=row.get("start_at"),
        end_at=row.get("end_at"),
        anchor=interval_anchor(row["created_at"]),
    )


def next_fire_times(row: Mapping[Any, Any], *, now: datetime) -> list[datetime]:
    """The schedule's next fire times (NEXT_FIRE_TIMES of them): from its `next_fire_at`, or, paused,
    from the first after `now` (when it would fire if it were resumed now)."""
    spec = spec_of(row)
    return spec.next_fire_times(spec.next_fire_time(now) if row["paused"] else row["next_fire_at"])


# What a schedule created without these fields gets (as the API documents them).
DEFAULTS: dict[str, Any] = {
    "payload": {},
    "priority": 5,
    "max_retries": 3,
    "timezone": "UTC",
    "jitter_sec": 0.0,
    "overlap": Overlap.SKIP.value,
    "catchup_window_sec": 300.0,
    "paused": False,
}


def _params(fields: Mapping[Any, Any]) -> dict[str, Any]:
    params = {name: fields.get(name) for name in SETTABLE}
    params |= {name: value for name, value in DEFAULTS.items() if params[name] is None}
    params["payload"] = Jsonb(params["payload"])
    params["overlap"] = str(params["overlap"])
    return params


def create_schedule(
    conn: Connection, fields: Mapping[Any, Any], *, source: str = "api", now: datetime | None = None
) -> RowMapping:
    """Insert a schedule (`fields`: the SETTABLE names, validated by the caller); its first fire is
    the first fire time after now. ScheduleNameTaken when the name is in use."""
    now = database_now(conn, now)
    spec = spec_of({**fields, "created_at": now})
    params = _params(fields)
    params.update(id=uuid.uuid4(), timezone=spec.timezone, cron=spec.cron, source=source, now=now)
    params["next_fire_at"] = spec.next_fire_time(now)
    row = _run(conn, INSERT_SCHEDULE, params).mappings().one_or_none()
    if row is None:
        raise ScheduleNameTaken(str(fields["name"]))
    return row  # type: ignore[no-any-return]


def get_schedule(conn: Connection, ref: str | uuid.UUID, *, lock: bool = False) -> RowMapping | None:
    """The schedule named `ref`, or whose id it is (a name never looks like a UUID)."""
    try:
        schedule_id = ref if isinstance(ref, uuid.UUID) else uuid.UUID(ref)
    except ValueError:
        sql = LOCK_SCHEDULE_BY_NAME if lock else SCHEDULE_BY_NAME
        return _run(conn, sql, {"name": ref}).mappings().one_or_none()  # type: ignore[no-any-return]
    sql = LOCK_SCHEDULE_BY_ID if lock else SCHEDULE_BY_ID
    return _run(conn, sql, {"id": schedule_id}).mappings().one_or_none()  # type: ignore[no-any-return]


def list_schedules(
    conn: Connection, *, limit: int, after: str | None = None, source: str | None = None
) -> list[RowMapping]:
    return list(_run(conn, LIST_SCHEDULES, {"after": after, "source": source, "limit": limit}).mappings())


_TIMING = ("cron", "every_sec", "timezone", "start_at", "end_at")


def update_schedule(
    conn: Connection, current: Mapping[Any, Any], changes: Mapping[Any, Any], *, now: datetime | None = None
) -> RowMapping:
    """Apply `changes` (SETTABLE names) to the schedule `current` (locked by the caller). A change of
    when it fires moves its next fire to the first new fire time after now; a fire waiting for the
    running task (buffer_one) is dropped then. ScheduleNameTaken, ValueError for a bad spec."""
    merged = {name: current[name] for name in SETTABLE} | dict(changes)
    merged["source"] = changes.get("source", current["source"])
    spec = spec_of({**merged, "created_at": current["created_at"]})
    params = _params(merged)
    params.update(id=current["id"], cron=spec.cron, source=merged["source"])
    if any(merged[name] != current[name] for name in _TIMING):
        params["next_fire_at"] = spec.next_fire_time(database_now(conn, now))
        params["buffered_for"] = None
    else:
        params["next_fire_at"] = current["next_fire_at"]
        params["buffered_for"] = current["buffered_for"]
    if merged["name"] != current["name"] and get_schedule(conn, str(merged["name"])) is not None:
        raise ScheduleNameTaken(str(merged["name"]))
    return _run(conn, UPDATE_SCHEDULE, params).mappings().one()  # type: ignore[no-any-return]


def delete_schedule(conn: Connection, schedule_id: uuid.UUID) -> bool:
    """Delete the schedule; its tasks stay (they keep its id)."""
    return bool(_run(conn, DELETE_SCHEDULE, {"id": schedule_id}).rowcount == 1)


def pause(conn: Connection, schedule_id: uuid.UUID, note: str | None) -> RowMapping:
    return _run(conn, PAUSE_SCHEDULE, {"id": schedule_id, "note": note}).mappings().one()  # type: ignore[no-any-return]


def resume(conn: Connection, row: Mapping[Any, Any], *, now: datetime | None = None) -> RowMapping:
    next_fire = spec_of(row).next_fire_time(database_now(conn, now))
    result = _run(conn, RESUME_SCHEDULE, {"id": row["id"], "next_fire_at": next_fire}).mappings().one()
    return result  # type: ignore[no-any-return]


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
    rows = list(_run(conn, LOCK_DUE, params).mappings())
    if len(rows) < limit:
        params["limit"] = limit - len(rows)
        rows += list(_run(conn, LOCK_BUFFERED_READY, params).mappings())
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
    created = list(_run(conn, CREATE_FIRED_TASKS, {"rows": Jsonb(rows)}))
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
    _run(conn, ADVANCE_SCHEDULES, {"rows": Jsonb(rows)})


def count_fires(conn: Connection, schedule_id: uuid.UUID, n: int) -> None:
    if n:
        _run(conn, COUNT_FIRES, {"id": schedule_id, "n": n})


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
    rows = _run(conn, FIRED_AMONG, {"id": schedule_id, "times": list(times)})
    return {r.scheduled_for for r in rows}


def seconds_until_next_fire(conn: Connection, *, now: datetime | None = None) -> float | None:
    value = _run(conn, SECONDS_UNTIL_NEXT_FIRE, {"now": now}).scalar_one()
    return None if value is None else float(value)


# --- schedules declared in code -----------------------------------------------------------------------------------


def lock_code_sync(conn: Connection) -> None:
    """Hold the code-sync lock until this transaction ends."""
    _run(conn, LOCK_CODE_SYNC)


def pause_undeclared(conn: Connection, declared: Sequence[str]) -> list[str]:
    """Pause the code schedules not in `declared` (they stay, with their tasks); their names."""
    rows = _run(conn, PAUSE_UNDECLARED, {"names": list(declared), "note": REMOVED_FROM_CODE})
    return [r.name for r in rows]


def schedule_counters(conn: Connection) -> list[tuple[str, int, int, int]]:
    """(name, fires, skips, misses) of every schedule, for /metrics."""
    conn.exec_driver_sql(TASK_COUNTS_TIMEOUT)
    return [(r.name, int(r.fires), int(r.skips), int(r.misses)) for r in _run(conn, SCHEDULE_COUNTERS)]
