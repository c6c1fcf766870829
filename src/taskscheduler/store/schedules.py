"""Recurring schedules as operators and code declare them: create, read, change, pause, resume.

Each statement is a public constant in psycopg's `%(name)s` style, run with `exec_driver_sql`, so that
it can be read and EXPLAINed by its name. What firing does (the scheduler's step, trigger, backfill)
is in `store.fires`; a schedule's row is written by these two modules only.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, RowMapping

from taskscheduler.schedule_spec import Overlap, Spec, interval_anchor
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


def run(conn: Connection, sql: str, params: Mapping[Any, Any] | None = None) -> Any:
    return conn.exec_driver_sql(sql, dict(params or {}))


def database_now(conn: Connection, now: datetime | None = None) -> datetime:
    value: datetime = run(conn, CLOCK, {"now": now}).scalar_one()
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
    row = run(conn, INSERT_SCHEDULE, params).mappings().one_or_none()
    if row is None:
        raise ScheduleNameTaken(str(fields["name"]))
    return row  # type: ignore[no-any-return]


def get_schedule(conn: Connection, ref: str | uuid.UUID, *, lock: bool = False) -> RowMapping | None:
    """The schedule named `ref`, or whose id it is (a name never looks like a UUID)."""
    try:
        schedule_id = ref if isinstance(ref, uuid.UUID) else uuid.UUID(ref)
    except ValueError:
        sql = LOCK_SCHEDULE_BY_NAME if lock else SCHEDULE_BY_NAME
        return run(conn, sql, {"name": ref}).mappings().one_or_none()  # type: ignore[no-any-return]
    sql = LOCK_SCHEDULE_BY_ID if lock else SCHEDULE_BY_ID
    return run(conn, sql, {"id": schedule_id}).mappings().one_or_none()  # type: ignore[no-any-return]


def list_schedules(
    conn: Connection, *, limit: int, after: str | None = None, source: str | None = None
) -> list[RowMapping]:
    return list(run(conn, LIST_SCHEDULES, {"after": after, "source": source, "limit": limit}).mappings())


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
    return run(conn, UPDATE_SCHEDULE, params).mappings().one()  # type: ignore[no-any-return]


def delete_schedule(conn: Connection, schedule_id: uuid.UUID) -> bool:
    """Delete the schedule; its tasks stay (they keep its id)."""
    return bool(run(conn, DELETE_SCHEDULE, {"id": schedule_id}).rowcount == 1)


def pause(conn: Connection, schedule_id: uuid.UUID, note: str | None) -> RowMapping:
    return run(conn, PAUSE_SCHEDULE, {"id": schedule_id, "note": note}).mappings().one()  # type: ignore[no-any-return]


def resume(conn: Connection, row: Mapping[Any, Any], *, now: datetime | None = None) -> RowMapping:
    next_fire = spec_of(row).next_fire_time(database_now(conn, now))
    result = run(conn, RESUME_SCHEDULE, {"id": row["id"], "next_fire_at": next_fire}).mappings().one()
    return result  # type: ignore[no-any-return]


# --- schedules declared in code -----------------------------------------------------------------------------------


def lock_code_sync(conn: Connection) -> None:
    """Hold the code-sync lock until this transaction ends."""
    run(conn, LOCK_CODE_SYNC)


def pause_undeclared(conn: Connection, declared: Sequence[str]) -> list[str]:
    """Pause the code schedules not in `declared` (they stay, with their tasks); their names."""
    rows = run(conn, PAUSE_UNDECLARED, {"names": list(declared), "note": REMOVED_FROM_CODE})
    return [r.name for r in rows]


def schedule_counters(conn: Connection) -> list[tuple[str, int, int, int]]:
    """(name, fires, skips, misses) of every schedule, for /metrics."""
    conn.exec_driver_sql(TASK_COUNTS_TIMEOUT)
    return [(r.name, int(r.fires), int(r.skips), int(r.misses)) for r in run(conn, SCHEDULE_COUNTERS)]
