"""Retention: delete finished tasks after RETENTION_DAYS and dlq_events after DLQ_RETENTION_DAYS, and
keep the partitions of `task_events` (create ahead, drop when old).

Finished means SUCCEEDED, DEAD or CANCELLED, aged by `finished_at`; a task's idempotency key goes with
it and can then be used again. A task's events are not deleted row by row: they go with the daily
(EVENTS_PARTITION_SEC) partition of `task_events` that holds them, dropped once older than
RETENTION_DAYS, after the events of tasks that still exist are moved out of it (store/partitions.py).
`dlq_events` are kept longer, as the audit trail of what died.

Deletes run in bounded batches, each its own short transaction (SKIP LOCKED: several schedulers share
the work), so the tables are never locked for long. A run goes on while batches come back full, for
at most `budget_sec`, so that it keeps up with any rate the system runs at without starving the
dispatch loop; a run that stops with work left says so (`more`), and the scheduler runs it again at
its next tick instead of RETENTION_INTERVAL_SEC later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from taskscheduler.config import Settings
from taskscheduler.store import dlq as dlq_store
from taskscheduler.store import partitions, sweeps
from taskscheduler.store import processes as process_store
from taskscheduler.store.db import Database

log = logging.getLogger(__name__)

BATCH_SIZE = 1000
# Wall time one run may spend deleting before it yields to the dispatch loop (checked between batches,
# so a run takes at most this plus one batch): what a task due meanwhile may wait. A batch of 1,000
# tasks takes 15-50 ms, so a tick deletes a few thousand, and ticks come many times a second under
# load: far above any rate one scheduler dispatches.
BUDGET_SEC = 0.1
DAY_SEC = 24 * 3600.0
# A process silent for a day is gone: its heartbeat row is deleted.
STALE_PROCESS_SEC = DAY_SEC


@dataclass(frozen=True)
class RetentionCounts:
    tasks: int = 0
    dlq_events: int = 0
    processes: int = 0
    # task_events partitions created ahead, dropped, and events of living tasks moved out of them.
    partitions_created: int = 0
    partitions_dropped: int = 0
    events_kept: int = 0
    # The run stopped on its budget with full batches behind it: run again soon.
    more: bool = False

    def __bool__(self) -> bool:
        return any((self.tasks, self.dlq_events, self.processes, self.partitions_created, self.partitions_dropped))


def run_once(
    *,
    database: Database,
    settings: Settings,
    now: datetime | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    budget_sec: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    maintain_partitions: bool = True,
) -> RetentionCounts:
    """One retention pass: batches of `batch_size` rows per table while they come back full, for at most
    `budget_sec` of `clock` (and `max_batches` per table, if given); defaults BATCH_SIZE and BUDGET_SEC.
    0 days keeps all.

    `maintain_partitions=False` skips the partitions of task_events (a run continued at the next tick)."""
    batch_size = batch_size or BATCH_SIZE
    deadline = clock() + (BUDGET_SEC if budget_sec is None else budget_sec)
    more = False

    def delete_older_than(days: float, delete_batch: Callable[..., int]) -> int:
        nonlocal more
        total = 0
        batches = 0
        while days > 0:
            with database.transaction() as conn:
                n = delete_batch(conn, older_than_sec=days * DAY_SEC, limit=batch_size, now=now)
            total += n
            batches += 1
            if n < batch_size:
                break
            if clock() >= deadline or (max_batches is not None and batches >= max_batches):
                more = True
                break
        return total

    tasks = delete_older_than(settings.retention_days, sweeps.delete_finished)
    dlq_events = delete_older_than(settings.dlq_retention_days, dlq_store.delete_old)
    with database.transaction() as conn:
        processes = process_store.delete_stale(conn, older_than_sec=STALE_PROCESS_SEC, now=now)
    kept = partitions.Maintenance()
    if maintain_partitions:
        kept = partitions.maintain(
            database,
            width_sec=settings.events_partition_sec,
            ahead=settings.events_partitions_ahead,
            retention_sec=settings.retention_days * DAY_SEC,
            now=now,
        )
    counts = RetentionCounts(
        tasks=tasks,
        dlq_events=dlq_events,
        processes=processes,
        partitions_created=kept.created,
        partitions_dropped=kept.dropped,
        events_kept=kept.events_kept,
        more=more,
    )
    if counts:
        log.info(
            "retention: deleted %d finished tasks, %d dlq_events; task_events partitions: %d created, %d dropped",
            tasks,
            dlq_events,
            kept.created,
            kept.dropped,
            extra={
                "event": "retention",
                "tasks": tasks,
                "dlq_events": dlq_events,
                "partitions_created": kept.created,
                "partitions_dropped": kept.dropped,
                "events_kept": kept.events_kept,
                "more": more,
            },
        )
    return counts
