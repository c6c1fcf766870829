"""The partitions of `task_events`: ranges of `at`, created ahead of time, dropped when old.

`task_events` is partitioned by range of `at` (EVENTS_PARTITION_SEC wide, a day by default), with a
DEFAULT partition as the safety net: an event never fails for want of a partition. The scheduler's
retention step (scheduler/retention.py) calls `maintain`, which

- creates the partitions of the next `ahead` widths, so that events land in a range partition;
- drops a partition once its upper bound is older than RETENTION_DAYS plus one width: its events are
  of tasks that finished long ago and were deleted by then. Events have no foreign key to their task,
  so deleting a task costs no index probe and delete per event; the events go here, a whole
  partition at a time. A task's audit trail must not lose events while the task exists (PENDING for
  60 days, retried for weeks), so before the drop the events of tasks that still exist are moved
  into the DEFAULT partition, with their id and `at` unchanged (a partition on `at` cannot hold them
  elsewhere: the partition of a row is decided by its `at`). They are found first, reading the old
  partition alone with no lock on task_events; then the partition is detached, so that no range
  partition covers those times any more, they are inserted (landing in the DEFAULT partition), and
  the partition is dropped, all under one short lock;
- deletes, in the DEFAULT partition only (small: the events of long-lived tasks, and of times no
  range partition covered), the events whose task is gone.

Readers never see the events of a deleted task: `operations.LIST_EVENTS` asks for the task too.

Creating and detaching a partition take an ACCESS EXCLUSIVE lock on `task_events` for a moment. Each
step is its own transaction with a short lock_timeout: behind a long query on task_events it gives
up (and tries again at the next run) instead of queueing every event insert behind it. An advisory
lock keeps two schedulers from doing the same step at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from taskscheduler.store.db import Database

log = logging.getLogger(__name__)

PARENT = "task_events"
DEFAULT_PARTITION = "task_events_default"
PARTITION_PREFIX = "task_events_p"
# pg_try_advisory_xact_lock key of the partition steps (any constant no other lock uses).
PARTITIONS_LOCK_ID = 7_412_093_219
# How long a step waits for its lock on task_events before it gives up until the next run.
LOCK_TIMEOUT_MS = 1000
# Most orphaned events deleted from the DEFAULT partition per run.
ORPHAN_BATCH = 10_000

TRY_LOCK = f"SELECT pg_try_advisory_xact_lock({PARTITIONS_LOCK_ID})"
TRY_SESSION_LOCK = f"SELECT pg_try_advisory_lock({PARTITIONS_LOCK_ID})"
UNLOCK_SESSION = f"SELECT pg_advisory_unlock({PARTITIONS_LOCK_ID})"
SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %(ms)s, true)"
DATABASE_NOW = "SELECT COALESCE(CAST(%(now)s AS timestamptz), now())"

# The range partitions and their bounds, read from the catalog (the bound is printed as
# `FOR VALUES FROM ('...') TO ('...')` in the session's time zone, read back in the same one).
RANGE_PARTITIONS = r"""
    SELECT c.relname AS name,
           CAST(substring(pg_get_expr(c.relpartbound, c.oid) FROM $$FROM \('([^']+)'\)$$) AS timestamptz) AS lower,
           CAST(substring(pg_get_expr(c.relpartbound, c.oid) FROM $$TO \('([^']+)'\)$$) AS timestamptz) AS upper
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = CAST('task_events' AS regclass) AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
    ORDER BY lower
    """

# The latest event in the DEFAULT partition at or after a time: a new partition must start after it
# (PostgreSQL refuses a partition whose range holds rows of the DEFAULT one).
LATEST_DEFAULT_FROM = f"SELECT max(at) FROM {DEFAULT_PARTITION} WHERE at >= %(start)s"

# Survivors of a dropped partition: the events of tasks that still exist. Found first, with no lock
# on task_events (the partition alone, read in full: a day of events), into a temporary table; then,
# under the short lock of the detach, moved into the DEFAULT partition. No task gains events in a
# partition this old meanwhile; one deleted meanwhile leaves orphans that the DEFAULT sweep deletes.
# Columns by name: a partition attached from an older table may order them differently.
_COLUMNS = "id, task_id, at, from_status, to_status, attempt, detail"
FORGET_KEPT = "DROP TABLE IF EXISTS pg_temp.kept_events"
FIND_LIVING_EVENTS = f"""
    CREATE TEMP TABLE kept_events AS
    SELECT {_COLUMNS} FROM {{partition}} e WHERE EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id)
    """
KEEP_LIVING_EVENTS = f"INSERT INTO {PARENT} ({_COLUMNS}) SELECT {_COLUMNS} FROM pg_temp.kept_events"

DELETE_ORPHANED_DEFAULT = f"""
    DELETE FROM {DEFAULT_PARTITION} d USING (
        SELECT ctid FROM {DEFAULT_PARTITION} e
        WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id)
        LIMIT %(limit)s
    ) o
    WHERE d.ctid = o.ctid
    """


@dataclass(frozen=True)
class Partition:
    name: str
    lower: datetime
    upper: datetime


@dataclass(frozen=True)
class Maintenance:
    created: int = 0
    dropped: int = 0
    # Events of tasks that still exist, moved out of dropped partitions into the DEFAULT one.
    events_kept: int = 0
    orphans_deleted: int = 0


def partition_name(lower: datetime) -> str:
    return PARTITION_PREFIX + lower.astimezone(UTC).strftime("%Y%m%d_%H%M%S")


def floor_to(t: datetime, width_sec: float) -> datetime:
    """The start of the width-aligned range that holds `t` (aligned on the Unix epoch, UTC)."""
    epoch = t.timestamp()
    return datetime.fromtimestamp(epoch - epoch % width_sec, UTC)


def range_partitions(conn: Connection) -> list[Partition]:
    return [Partition(r.name, r.lower, r.upper) for r in conn.exec_driver_sql(RANGE_PARTITIONS)]


def _literal(t: datetime) -> str:
    return "'" + t.astimezone(UTC).isoformat() + "'"


def create_partition_sql(lower: datetime, upper: datetime) -> str:
    return (
        f"CREATE TABLE {partition_name(lower)} PARTITION OF {PARENT} "
        f"FOR VALUES FROM ({_literal(lower)}) TO ({_literal(upper)})"
    )


def _begin_step(conn: Connection) -> bool:
    """Take the partitions lock (False: another scheduler is at it) and bound lock waits."""
    if not conn.exec_driver_sql(TRY_LOCK).scalar_one():
        return False
    conn.exec_driver_sql(SET_LOCK_TIMEOUT, {"ms": str(LOCK_TIMEOUT_MS)})
    return True


def create_ahead(conn: Connection, *, width_sec: float, ahead: int, now: datetime) -> int:
    """Create the partitions that cover now .. now + `ahead` widths and do not exist yet. Returns how many.

    New partitions continue from the last one (or start at the range that holds `now`); past times no
    partition covered stay in the DEFAULT partition."""
    existing = range_partitions(conn)
    start = floor_to(now, width_sec)
    if existing:
        start = max(start, existing[-1].upper)
    latest = conn.exec_driver_sql(LATEST_DEFAULT_FROM, {"start": start}).scalar_one()
    if latest is not None:
        start = floor_to(latest, width_sec) + timedelta(seconds=width_sec)
    horizon = now + timedelta(seconds=width_sec * ahead)
    created = 0
    while start < horizon:
        upper = start + timedelta(seconds=width_sec)
        conn.exec_driver_sql(create_partition_sql(start, upper))
        created += 1
        start = upper
    return created


def drop_partition(conn: Connection, partition: Partition) -> int | None:
    """Move the events of tasks that still exist out of `partition` into the DEFAULT partition, and
    drop it. Returns how many events were kept; None if another scheduler holds the partitions lock.

    `conn` is not in a transaction: this commits twice. The partitions lock is held for the session
    meanwhile, so that another scheduler neither drops the same partition nor creates one."""
    if not conn.exec_driver_sql(TRY_SESSION_LOCK).scalar_one():
        conn.commit()
        return None
    try:
        conn.commit()
        if partition.name not in {p.name for p in range_partitions(conn)}:
            return 0  # dropped by another scheduler since it was listed
        # The long part, with no lock on task_events: a temporary table of this connection.
        conn.exec_driver_sql(FORGET_KEPT)
        conn.exec_driver_sql(FIND_LIVING_EVENTS.format(partition=partition.name))
        conn.commit()
        # The short part: task_events locked while detached, the survivors moved, the table dropped.
        conn.exec_driver_sql(SET_LOCK_TIMEOUT, {"ms": str(LOCK_TIMEOUT_MS)})
        conn.exec_driver_sql(f"ALTER TABLE {PARENT} DETACH PARTITION {partition.name}")
        kept = int(conn.exec_driver_sql(KEEP_LIVING_EVENTS).rowcount)
        conn.exec_driver_sql(f"DROP TABLE {partition.name}")
        conn.commit()
        return kept
    finally:
        conn.rollback()
        conn.exec_driver_sql(FORGET_KEPT)
        conn.exec_driver_sql(UNLOCK_SESSION)
        conn.commit()


def delete_orphaned_default(conn: Connection, *, limit: int = ORPHAN_BATCH) -> int:
    """Delete up to `limit` events of the DEFAULT partition whose task is gone."""
    return conn.exec_driver_sql(DELETE_ORPHANED_DEFAULT, {"limit": limit}).rowcount


def _lock_refused(exc: DBAPIError) -> bool:
    return isinstance(exc.orig, psycopg.errors.LockNotAvailable)


def maintain(
    database: Database, *, width_sec: float, ahead: int, retention_sec: float, now: datetime | None = None
) -> Maintenance:
    """Create partitions ahead, drop those older than `retention_sec` + one width (0: keep all), and
    delete orphaned events of the DEFAULT partition. Each step its own short transaction."""
    created = dropped = kept = orphans = 0
    try:
        with database.transaction() as conn:
            if not _begin_step(conn):
                return Maintenance()
            at = conn.exec_driver_sql(DATABASE_NOW, {"now": now}).scalar_one()
            created = create_ahead(conn, width_sec=width_sec, ahead=ahead, now=at)
        if retention_sec > 0:
            cutoff = at - timedelta(seconds=retention_sec + width_sec)
            with database.transaction() as conn:
                old = [p for p in range_partitions(conn) if p.upper <= cutoff]
            with database.engine.connect() as conn:
                for partition in old:
                    moved = drop_partition(conn, partition)
                    if moved is None:
                        break
                    kept += moved
                    dropped += 1
            with database.transaction() as conn:
                if _begin_step(conn):
                    orphans = delete_orphaned_default(conn)
    except DBAPIError as exc:
        if not _lock_refused(exc):
            raise
        log.warning(
            "task_events partitions: lock not granted within %d ms (a long query on task_events?); next run",
            LOCK_TIMEOUT_MS,
            extra={"event": "partitions_lock_timeout"},
        )
    return Maintenance(created=created, dropped=dropped, events_kept=kept, orphans_deleted=orphans)
