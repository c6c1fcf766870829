"""Due PENDING/FAILED tasks -> ENQUEUED, then one message per task on its priority's queue."""

from __future__ import annotations

import logging
import os
from datetime import datetime

from taskscheduler.config import Settings
from taskscheduler.scheduler.publisher import Publisher
from taskscheduler.store import db
from taskscheduler.store import tasks as task_store

log = logging.getLogger(__name__)

# Test-only fault point (FAULT_POINT): die between the commit and the publish, the window in which
# only the lost-message sweep can save the batch.
FAULT_AFTER_COMMIT = "dispatch_after_commit"


def run_once(*, settings: Settings, publisher: Publisher, now: datetime | None = None) -> int:
    """Dispatch one batch (at most DISPATCH_BATCH_SIZE). Returns how many were dispatched.

    The attempt is incremented and committed before the message leaves: a crash in between leaves
    the task ENQUEUED, and the rescue sweep publishes it again with the same attempt.
    """
    with db.transaction() as conn:
        batch = task_store.dispatch_due(conn, limit=settings.dispatch_batch_size, now=now)
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
