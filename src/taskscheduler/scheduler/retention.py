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

from taskscheduler.config import Settings
from taskscheduler.store import dlq as dlq_store
from taskscheduler.store import processes as process_store
from taskscheduler.store import sweeps
from taskscheduler.store.db import Database

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


def run_once(
    *,
    database: Database,
    settings: Settings,
    now: datetime | None = None,
    batch_size: int = BATCH_SIZE,
    max_batches: int = MAX_BATCHES,
) -> RetentionCounts:
    """One retention pass: at most `max_batches` batches of `batch_size` rows per table. 0 days keeps all."""

    def delete_older_than(days: float, delete_batch: Callable[..., int]) -> int:
        total = 0
        for _ in range(max_batches if days > 0 else 0):
            with database.transaction() as conn:
                n = delete_batch(conn, older_than_sec=days * DAY_SEC, limit=batch_size, now=now)
            total += n
            if n < batch_size:
                break
        return total

    tasks = delete_older_than(settings.retention_days, sweeps.delete_finished)
    dlq_events = delete_older_than(settings.dlq_retention_days, dlq_store.delete_old)
    with database.transaction() as conn:
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
