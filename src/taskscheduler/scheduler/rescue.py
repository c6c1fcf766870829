"""Rescue: stuck STARTED tasks, ENQUEUED tasks whose message was lost, DEAD tasks missing their DLQ row.

Work stays bounded when a part is down. A heartbeat missed while the database was unreachable is not
held against a worker (`reconnected_at`). A message is published again only while the broker holds
fewer messages for its queue than the queue has unclaimed tasks, so a queue whose workers (or the DLQ
worker) are away does not fill the broker with duplicates. A pass that cannot reach the broker
publishes nothing and leaves the rest of the sweep to run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from taskscheduler import metrics
from taskscheduler.broker import DeadMessage
from taskscheduler.config import Settings
from taskscheduler.lifecycle import TASK_QUEUES, DeadWith, Queue, failure_outcome
from taskscheduler.scheduler.horizons import Horizons
from taskscheduler.scheduler.publisher import BrokerHealth, BrokerQueues, BrokerUnavailable, Publisher
from taskscheduler.store import sweeps, transitions
from taskscheduler.store.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RescueCounts:
    retried: int = 0
    dead: int = 0
    republished: int = 0
    dlq_republished: int = 0

    def __bool__(self) -> bool:
        return any((self.retried, self.dead, self.republished, self.dlq_republished))


def rescue_stuck(
    *,
    database: Database,
    settings: Settings,
    publisher: Publisher,
    now: datetime | None = None,
    reconnected_at: datetime | None = None,
    horizons: Horizons | None = None,
) -> tuple[int, int]:
    """STARTED past its heartbeat timeout or its run-time limit -> FAILED (retry) or DEAD. Returns (retried, dead).

    `reconnected_at` (database clock): when this scheduler last regained the database; heartbeat
    silence is counted from no earlier than that (see `sweeps.lock_stuck`).
    """
    retried = 0
    dead: list[DeadMessage] = []
    with database.transaction() as conn:
        since = horizons.started if horizons else None
        if horizons is not None:
            horizons.oldest_started(sweeps.oldest_started(conn, since=since))
        stuck = sweeps.lock_stuck(
            conn,
            since=since,
            heartbeat_timeout_sec=settings.heartbeat_timeout_sec,
            default_timeout_sec=settings.stuck_after_sec,
            limit=settings.dispatch_batch_size,
            reconnected_at=reconnected_at,
            now=now,
        )
        for task in stuck:
            why = "no heartbeat" if task.by_heartbeat else "ran past its timeout"
            metrics.RESCUES.labels(reason="no_heartbeat" if task.by_heartbeat else "timeout").inc()
            error = f"stuck: {why} (worker crashed or hung)"
            fields = {"task_id": str(task.id), "attempt": task.attempt, "event": "rescued"}
            # Stuck counts as timed out: DEAD for its timeout once out of retries.
            outcome = failure_outcome(
                attempt=task.attempt,
                max_retries=task.max_retries,
                retry_base_attempt=task.retry_base_attempt,
                timed_out=True,
                backoff_base_sec=settings.retry_backoff_base_sec,
                backoff_max_sec=settings.retry_backoff_max_sec,
            )
            if isinstance(outcome, DeadWith):
                name = transitions.kill(conn, task_id=task.id, attempt=task.attempt, error=error, reason=outcome.reason)
                if name is not None:
                    dead.append(
                        DeadMessage(
                            task_id=task.id, attempt=task.attempt, name=name, reason=outcome.reason, error=error
                        )
                    )
                    log.info("STARTED -> DEAD (%s)", outcome.reason, extra=fields)
            elif transitions.fail(
                conn, task_id=task.id, attempt=task.attempt, error=error, retry_in_sec=outcome.delay_sec
            ):
                retried += 1
                log.info("STARTED -> FAILED (%s), retry in %.2fs", why, outcome.delay_sec, extra=fields)
    # If the broker is away, they are DEAD without a DLQ row: the DLQ sweep publishes them later.
    _unless_broker_down(lambda: publisher.publish_dead(dead))
    return retried, len(dead)


def republish_lost(
    *,
    database: Database,
    settings: Settings,
    publisher: Publisher,
    broker: BrokerQueues,
    now: datetime | None = None,
    horizons: Horizons | None = None,
) -> int:
    """ENQUEUED but unclaimed for ENQUEUE_TIMEOUT_SEC: publish the same attempt again, while the
    broker holds fewer messages for the queue than it has unclaimed tasks."""
    waiting = broker.waiting([q.value for q in TASK_QUEUES], kind="republish")
    lost: list[sweeps.Dispatched] = []
    with database.transaction() as conn:
        for queue in TASK_QUEUES:
            lost += sweeps.take_lost_enqueued(
                conn,
                queue=queue.value,
                timeout_sec=settings.enqueue_timeout_sec,
                limit=settings.dispatch_batch_size,
                waiting=waiting[queue.value],
                now=now,
                since=horizons.enqueued if horizons else None,
            )
    for item in lost:
        metrics.RESCUES.labels(reason="lost_message").inc()
        log.info(
            "ENQUEUED message re-published",
            extra={"task_id": str(item.id), "attempt": item.attempt, "event": "republished"},
        )
    return publisher.publish_attempts(lost)


def republish_dead(
    *, database: Database, settings: Settings, publisher: Publisher, broker: BrokerQueues, now: datetime | None = None
) -> int:
    """DEAD without its dlq_events row after ENQUEUE_TIMEOUT_SEC: publish the DLQ message again, unless
    the DLQ queue already holds a message for each such task (its worker is away)."""
    waiting = broker.waiting([Queue.DLQ.value], kind="dlq_republish")[Queue.DLQ.value]
    with database.transaction() as conn:
        dead = sweeps.take_unrecorded_dead(
            conn, timeout_sec=settings.enqueue_timeout_sec, limit=settings.dispatch_batch_size, waiting=waiting, now=now
        )
    for item in dead:
        metrics.RESCUES.labels(reason="dlq_republished").inc()
        log.info(
            "DLQ message re-published",
            extra={"task_id": str(item.id), "attempt": item.attempt, "event": "dlq_republished"},
        )
    return publisher.publish_dead(
        [DeadMessage(task_id=d.id, attempt=d.attempt, name=d.name, reason=d.reason, error=d.error) for d in dead]
    )


def _unless_broker_down(step: Callable[[], int]) -> int:
    try:
        return step()
    except BrokerUnavailable:  # counted and logged by the publisher; the next sweep tries again
        return 0


def run_once(
    *,
    database: Database,
    settings: Settings,
    publisher: Publisher,
    now: datetime | None = None,
    reconnected_at: datetime | None = None,
    broker: BrokerQueues | None = None,
    horizons: Horizons | None = None,
) -> RescueCounts:
    """One sweep. `reconnected_at`: see `rescue_stuck`. `broker`: where queue lengths are read (default:
    REDIS_URL, with failures counted apart from the service's). `horizons`: where the stuck and
    lost-message scans start (None: from the start)."""
    broker = broker or BrokerQueues(settings, BrokerHealth())
    retried, dead = rescue_stuck(
        database=database,
        settings=settings,
        publisher=publisher,
        now=now,
        reconnected_at=reconnected_at,
        horizons=horizons,
    )
    republished = _unless_broker_down(
        lambda: republish_lost(
            database=database, settings=settings, publisher=publisher, broker=broker, now=now, horizons=horizons
        )
    )
    dlq_republished = _unless_broker_down(
        lambda: republish_dead(database=database, settings=settings, publisher=publisher, broker=broker, now=now)
    )
    return RescueCounts(retried=retried, dead=dead, republished=republished, dlq_republished=dlq_republished)
