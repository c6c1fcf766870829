"""Retention: delete finished tasks after RETENTION_DAYS and dlq_events after DLQ_RETENTION_DAYS.

Finished means SUCCEEDED, DEAD or CANCELLED, aged by `finished_at`; a task's events go with it
(ON DELETE CASCADE), and so does its idempotency key, which can then be used again. `dlq_events`
have no foreign key and are kept longer, as the audit trail of what died. Deletes run in bounded
batches, each its own short transaction (SKIP LOCKED: several schedulers share the work), so the
tables are never locked for long and the scheduler loop keeps its pace under a large backlog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from taskscheduler.config import Settings
from taskscheduler.store import db, sweeps
from taskscheduler.store import dlq as dlq_store
from taskscheduler.store import processes as process_store

log = logging.getLogger(__name__)

BATCH_SIZE = 1000
# Most batches per table in one run; the rest waits for the next run (RETENTION_INTERVAL_SEC later).
MAX_BATCHES = 10
DAY_SEC = 24 * 3600.0
# A process silent for a day is gone: its heartbeat row is deleted.
STALE_PROCESS_SEC = DAY_SEC


@dataclass(frozen=True)
class RetentionCounts:
    tasks: int = 0
    dlq_events: int = 0
    processes: int = 0

    def __bool__(self) -> bool:
        return any((self.tasks, self.dlq_events, self.processes))


def _batches(delete_batch: Callable[[Connection], int], batch_size: int, max_batches: int) -> int:
    total = 0
    for _ in range(max_batches):
        with db.transaction() as conn:
            n = delete_batch(conn)
        total += n
        if n < batch_size:
            break
    return total


def run_once(
    *, settings: Settings, now: datetime | None = None, batch_size: int = BATCH_SIZE, max_batches: int = MAX_BATCHES
) -> RetentionCounts:
    """One retention pass: at most `max_batches` batches of `batch_size` rows per table. 0 days keeps all."""
    tasks = dlq_events = 0
    if settings.retention_days > 0:
        older = settings.retention_days * DAY_SEC
        tasks = _batches(
            lambda conn: sweeps.delete_finished(conn, older_than_sec=older, limit=batch_size, now=now),
            batch_size,
            max_batches,
        )
    if settings.dlq_retention_days > 0:
        older = settings.dlq_retention_days * DAY_SEC
        dlq_events = _batches(
            lambda conn: dlq_store.delete_old(conn, older_than_sec=older, limit=batch_size, now=now),
            batch_size,
            max_batches,
        )
    with db.transaction() as conn:
        processes = process_store.delete_stale(conn, older_than_sec=STALE_PROCESS_SEC, now=now)
    counts = RetentionCounts(tasks=tasks, dlq_events=dlq_events, processes=processes)
    if counts:
        log.info(
            "retention: deleted %d finished tasks, %d dlq_events",
            tasks,
            dlq_events,
            extra={"event": "retention", "tasks": tasks, "dlq_events": dlq_events},
        )
    return counts
