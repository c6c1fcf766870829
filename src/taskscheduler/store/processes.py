"""Liveness of the long-running processes: one `process_heartbeats` row per running api, scheduler or worker.

`taskscheduler check <role>` (the compose healthcheck) asks whether a process of that role on this
host wrote its row recently. Times are the database's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from taskscheduler.store.sql import NOW

BEAT = """
    INSERT INTO process_heartbeats (id, role, hostname, pid, detail)
    VALUES (%(id)s, %(role)s, %(hostname)s, %(pid)s, %(detail)s)
    ON CONFLICT (id) DO UPDATE SET seen_at = now()
    """


def beat(conn: Connection, *, process_id: str, role: str, hostname: str, pid: int, detail: str = "") -> None:
    """Record that the process is alive now."""
    params = {"id": process_id, "role": role, "hostname": hostname, "pid": pid, "detail": detail}
    conn.exec_driver_sql(BEAT, params)


REMOVE = "DELETE FROM process_heartbeats WHERE id = %(id)s"


def remove(conn: Connection, process_id: str) -> None:
    """A clean stop: the process is gone, say so at once."""
    conn.exec_driver_sql(REMOVE, {"id": process_id})


@dataclass(frozen=True)
class LastSeen:
    pid: int
    hostname: str
    detail: str
    age_sec: float


LAST_SEEN = """
    SELECT pid, hostname, detail, EXTRACT(EPOCH FROM now() - seen_at)::float8 AS age_sec
    FROM process_heartbeats
    WHERE role = %(role)s
      AND (CAST(%(hostname)s AS text) IS NULL OR hostname = %(hostname)s)
      AND (CAST(%(queue)s AS text) IS NULL OR %(queue)s = ANY(string_to_array(detail, ',')))
    ORDER BY seen_at DESC
    LIMIT 1
    """


def last_seen(conn: Connection, *, role: str, hostname: str | None, queue: str | None = None) -> LastSeen | None:
    """The most recent heartbeat of a `role` process (on `hostname`, serving `queue`, when given)."""
    row = conn.exec_driver_sql(LAST_SEEN, {"role": role, "hostname": hostname, "queue": queue}).one_or_none()
    if row is None:
        return None
    return LastSeen(pid=row.pid, hostname=row.hostname, detail=row.detail, age_sec=max(0.0, row.age_sec))


DELETE_STALE = f"DELETE FROM process_heartbeats WHERE seen_at < {NOW} - make_interval(secs => %(older_than_sec)s)"


def delete_stale(conn: Connection, *, older_than_sec: float, now: datetime | None = None) -> int:
    """Forget processes silent for `older_than_sec` (they died without a clean stop)."""
    return conn.exec_driver_sql(DELETE_STALE, {"older_than_sec": older_than_sec, "now": now}).rowcount


BEATING_PIDS = "SELECT DISTINCT pid FROM process_heartbeats WHERE hostname = %(hostname)s AND pid = ANY(%(pids)s)"


def beating_pids(conn: Connection, *, hostname: str, pids: list[int]) -> set[int]:
    """Which of `pids` on `hostname` have recorded a heartbeat: they are up (for `taskscheduler dev`)."""
    rows = conn.exec_driver_sql(BEATING_PIDS, {"hostname": hostname, "pids": pids})
    return {row.pid for row in rows}
