"""Rescue: stuck STARTED tasks, ENQUEUED tasks whose message was lost, DEAD tasks missing their DLQ row."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from taskscheduler import metrics
from taskscheduler.config import Settings
from taskscheduler.lifecycle import DlqReason, backoff_sec, has_retries_left
from taskscheduler.scheduler.publisher import DeadMessage, Publisher
from taskscheduler.store import db
from taskscheduler.store import tasks as task_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RescueCounts:
    retried: int = 0
    dead: int = 0
    republished: int = 0
    dlq_republished: int = 0

    def __bool__(self) -> bool:
        return any((self.retried, self.dead, self.republished, self.dlq_republished))


def rescue_stuck(*, settings: Settings, publisher: Publisher, now: datetime | None = None) -> tuple[int, int]:
    """STARTED past its heartbeat timeout or its run-time limit -> FAILED (retry) or DEAD. Returns (retried, dead)."""
    retried = 0
    dead: list[DeadMessage] = []
    with db.transaction() as conn:
        stuck = task_store.lock_stuck(
            conn,
            heartbeat_timeout_sec=settings.heartbeat_timeout_sec,
            default_timeout_sec=settings.stuck_after_sec,
            limit=settings.dispatch_batch_size,
            now=now,
        )
        for task in stuck:
            why = "no heartbeat" if task.by_heartbeat else "ran past its timeout"
            metrics.RESCUES.labels(reason="no_heartbeat" if task.by_heartbeat else "timeout").inc()
            error = f"stuck: {why} (worker crashed or hung)"
            fields = {"task_id": str(task.id), "attempt": task.attempt, "event": "rescued"}
            if has_retries_left(task.attempt, task.max_retries, task.retry_base_attempt):
                delay = backoff_sec(
                    task.attempt - task.retry_base_attempt,
                    base=settings.retry_backoff_base_sec,
                    cap=settings.retry_backoff_max_sec,
                )
                if task_store.fail(conn, task_id=task.id, attempt=task.attempt, error=error, retry_in_sec=delay):
                    retried += 1
                    log.info("STARTED -> FAILED (%s), retry in %.2fs", why, delay, extra=fields)
            else:
                reason = DlqReason.STUCK_TASK_TIMEOUT
                name = task_store.kill(conn, task_id=task.id, attempt=task.attempt, error=error, reason=reason)
                if name is not None:
                    dead.append((task.id, task.attempt, name, reason.value, error))
                    log.info("STARTED -> DEAD (%s)", reason, extra=fields)
    publisher.publish_dead(dead)
    return retried, len(dead)


def republish_lost(*, settings: Settings, publisher: Publisher, now: datetime | None = None) -> int:
    """ENQUEUED but unclaimed for ENQUEUE_TIMEOUT_SEC: publish the same attempt again."""
    with db.transaction() as conn:
        lost = task_store.take_lost_enqueued(
            conn, timeout_sec=settings.enqueue_timeout_sec, limit=settings.dispatch_batch_size, now=now
        )
    for item in lost:
        metrics.RESCUES.labels(reason="lost_message").inc()
        log.info(
            "ENQUEUED message re-published",
            extra={"task_id": str(item.id), "attempt": item.attempt, "event": "republished"},
        )
    return publisher.publish_attempts(lost)


def republish_dead(*, settings: Settings, publisher: Publisher, now: datetime | None = None) -> int:
    """DEAD without its dlq_events row after ENQUEUE_TIMEOUT_SEC: publish the DLQ message again."""
    with db.transaction() as conn:
        dead = task_store.take_unrecorded_dead(
            conn, timeout_sec=settings.enqueue_timeout_sec, limit=settings.dispatch_batch_size, now=now
        )
    for item in dead:
        metrics.RESCUES.labels(reason="dlq_republished").inc()
        log.info(
            "DLQ message re-published",
            extra={"task_id": str(item.id), "attempt": item.attempt, "event": "dlq_republished"},
        )
    return publisher.publish_dead([(d.id, d.attempt, d.name, d.reason, d.error) for d in dead])


def run_once(*, settings: Settings, publisher: Publisher, now: datetime | None = None) -> RescueCounts:
    retried, dead = rescue_stuck(settings=settings, publisher=publisher, now=now)
    return RescueCounts(
        retried=retried,
        dead=dead,
        republished=republish_lost(settings=settings, publisher=publisher, now=now),
        dlq_republished=republish_dead(settings=settings, publisher=publisher, now=now),
    )
