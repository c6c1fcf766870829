"""Due PENDING/FAILED tasks -> ENQUEUED, then published to their priority's queue (see `broker.messages_for`)."""

from __future__ import annotations

import logging
import os
from datetime import datetime

from taskscheduler import explain
from taskscheduler.config import Settings
from taskscheduler.lifecycle import TASK_QUEUES
from taskscheduler.scheduler.horizons import Horizons
from taskscheduler.scheduler.publisher import Publisher
from taskscheduler.store import sweeps
from taskscheduler.store.db import Database

log = logging.getLogger(__name__)

# Test-only fault point (FAULT_POINT): die between the commit and the publish, the window in which
# only the lost-message sweep can save the batch.
FAULT_AFTER_COMMIT = "dispatch_after_commit"


def run_once(
    *,
    database: Database,
    settings: Settings,
    publisher: Publisher,
    now: datetime | None = None,
    horizons: Horizons | None = None,
) -> int:
    """Dispatch one batch per queue (at most DISPATCH_BATCH_SIZE each). Returns how many were dispatched.

    The attempt is incremented and committed before the message leaves: a crash in between leaves
    the task ENQUEUED, and the rescue sweep publishes it again with the same attempt.

    Back-pressure: a queue holding MAX_ENQUEUED_PER_QUEUE unclaimed tasks gets no more until its
    workers catch up. Due tasks wait in PENDING instead, where priorities still order them, and a
    message never waits in the broker so long that the lost-message sweep publishes it twice. A
    full queue is topped up once a quarter of it (at most a batch) has drained, not task by task:
    under a backlog that keeps ticks few and batches large.

    `horizons`: where the scans start, advanced by what they found (None: from the start).
    """
    refill_at = explain.refill_at(settings.dispatch_batch_size, settings.max_enqueued_per_queue)
    batch: list[sweeps.Dispatched] = []
    with database.transaction() as conn:
        enqueued = sweeps.enqueued_counts(conn, since=horizons.enqueued if horizons else None)
        waiting = enqueued.per_queue
        for queue in TASK_QUEUES:
            room = min(settings.dispatch_batch_size, settings.max_enqueued_per_queue - waiting.get(queue, 0))
            if room >= refill_at:
                batch += sweeps.dispatch_due(
                    conn, queue=queue.value, limit=room, now=now, since=horizons.due if horizons else None
                )
    if horizons is not None:
        horizons.oldest_enqueued(enqueued.oldest)
        horizons.dispatched(batch)
    if not batch:
        return 0
    if settings.fault_point == FAULT_AFTER_COMMIT:
        os._exit(17)
    publisher.publish_attempts(batch)
    for item in batch:
        log.info(
            "-> ENQUEUED",
            extra={"task_id": str(item.id), "attempt": item.attempt, "queue": item.queue, "event": "enqueued"},
        )
    return len(batch)
