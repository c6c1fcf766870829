"""The Celery app and its configuration, the queues, the messages and how they are published.

Celery only carries "run attempt N of task X now" (EXECUTE, `[[task_id, attempt], ...]`) and "this
attempt is DEAD" (RECORD_DEAD). The scheduler and the worker both publish through this module, by
task name: neither needs the other to be imported. The worker (`taskscheduler.worker`) registers the
tasks that consume these messages under the same names.
"""

from __future__ import annotations

import math
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.entity import Queue as KombuQueue

from taskscheduler.config import Settings, get_settings
from taskscheduler.lifecycle import Queue
from taskscheduler.store.sweeps import Dispatched

# Celery task names: messages in flight carry them, so they never change.
EXECUTE = "taskscheduler.execute_many"
RECORD_DEAD = "taskscheduler.record_dead"
# Seconds between a task's own time limit (the handler is interrupted and the attempt fails) and
# the message's hard one (the pool process is killed; the stuck sweep then rescues the task).
HARD_LIMIT_GRACE_SEC = 5.0
# A message with several attempts starts them one after another for at most this long, then sends
# the rest back to its queue (at once, even while one still runs): neither a deep batch nor a slow
# attempt keeps other pool processes idle, nor delays a warm shutdown, for longer than that.
MESSAGE_SLICE_SEC = 1.0
# Split a batch over at least this many messages, so that as many pool processes share it.
SPREAD_OVER_MESSAGES = 8
# Handler names a message's shadow name lists at most; the count says how many tasks it carries.
_NAMES_SHOWN = 3
_COUNT_SUFFIX = re.compile(r" \(\d+ tasks\)$")

Attempt = tuple[uuid.UUID, int]
"""One attempt of one task, as a message names it: `(task_id, attempt)`."""

celery_app = Celery("taskscheduler", set_as_current=True)
_configured_for: str | None = None


def configure_celery(settings: Settings | None = None) -> Celery:
    """Point the Celery app at REDIS_URL. Called by every process before it publishes or consumes,
    and by `taskscheduler.celery` (the app `celery -A taskscheduler` finds), which needs no more."""
    global _configured_for
    settings = settings or get_settings()
    redis_url = settings.require_redis_url()
    key = f"{redis_url}|{settings.redis_key_prefix}|{settings.task_events}"
    if _configured_for == key:
        return celery_app
    # No ack emulation: kombu's Redis transport would otherwise keep every fetched message in an
    # `unacked` hash until acked, at two synchronous Redis round trips per message in the worker's
    # consumer (most of its CPU with one task per message), to restore it after a crash only once
    # its visibility timeout (an hour) has passed. Our messages are acked early and a lost one is
    # published again from the database after ENQUEUE_TIMEOUT_SEC, so that bookkeeping buys nothing.
    transport_options: dict[str, Any] = {"ack_emulation": False}
    if settings.redis_key_prefix:
        transport_options["global_keyprefix"] = settings.redis_key_prefix
    celery_app.conf.update(
        broker_url=redis_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_queues=[KombuQueue(q.value, routing_key=q.value) for q in Queue],
        task_default_queue=Queue.DEFAULT.value,
        task_create_missing_queues=False,
        # One message at a time per pool process: a long task never sits on a message another
        # worker could run, and a crash loses at most one unstarted message (re-published later).
        # With early acks the multiplier alone still lets a busy worker reserve one more message
        # (Celery's docs say so); disable_prefetch (Redis only) fetches only while a process is free.
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Task events (TASK_EVENTS) are what Flower and `celery events` show: received, started,
        # succeeded... per message, sent by the workers. Not task-sent: it names the message
        # EXECUTE rather than its shadow name and travels apart from the message, so it may reach
        # Flower after the worker's events and rename the task back.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=False,
        enable_utc=True,
    )
    _configured_for = key
    return celery_app


# --- the messages ---------------------------------------------------------------------------------------------


def encode_attempts(items: Iterable[Attempt]) -> list[list[Any]]:
    """An EXECUTE message's argument: `[[task_id, attempt], ...]`, as JSON carries it."""
    return [[str(task_id), attempt] for task_id, attempt in items]


def decode_attempts(body: Iterable[Sequence[Any]]) -> list[Attempt]:
    """The attempts an EXECUTE message's argument names (see `encode_attempts`)."""
    return [(uuid.UUID(str(task_id)), int(attempt)) for task_id, attempt in body]


@dataclass(frozen=True, kw_only=True)
class DeadMessage:
    """A RECORD_DEAD message: attempt `attempt` of task `task_id` (handler `name`) is DEAD."""

    task_id: uuid.UUID
    attempt: int
    name: str
    reason: str
    error: str | None

    def encode(self) -> tuple[str, int, str, str, str | None]:
        """The RECORD_DEAD task's positional arguments."""
        return (str(self.task_id), self.attempt, self.name, str(self.reason), self.error)

    @classmethod
    def decode(cls, task_id: str, attempt: int, name: str, reason: str, error: str | None) -> DeadMessage:
        """The message a RECORD_DEAD task's arguments carry (see `encode`)."""
        return cls(task_id=uuid.UUID(str(task_id)), attempt=int(attempt), name=name, reason=reason, error=error)


def messages_for(items: Iterable[Dispatched], *, max_per_message: int) -> list[list[Dispatched]]:
    """Group attempts into messages: per queue, in order, over at least SPREAD_OVER_MESSAGES messages
    of at most `max_per_message` attempts each.

    A few due tasks go one per message, to as many pool processes; a deep backlog pays Celery's
    per-message cost (publish, BRPOP, ack, the pool hand-off) once for many tasks.
    """
    by_queue: dict[str, list[Dispatched]] = defaultdict(list)
    for item in items:
        by_queue[item.queue].append(item)
    messages: list[list[Dispatched]] = []
    for queued in by_queue.values():
        size = max(1, min(max_per_message, math.ceil(len(queued) / SPREAD_OVER_MESSAGES)))
        messages += [queued[start : start + size] for start in range(0, len(queued), size)]
    return messages


def message_name(names: Sequence[str]) -> str | None:
    """The name Flower, `celery events` and Celery's logs show for a message instead of
    EXECUTE (its shadow name): the handler names it carries, e.g. `send_email`,
    `send_email (20 tasks)`, `send_email, resize (5 tasks)`, `a, b, c +2 more (9 tasks)`.
    None (EXECUTE) when the names are unknown."""
    distinct = list(dict.fromkeys(name for name in names if name))
    if not distinct:
        return None
    shown = ", ".join(distinct[:_NAMES_SHOWN])
    if len(distinct) > _NAMES_SHOWN:
        shown += f" +{len(distinct) - _NAMES_SHOWN} more"
    return shown if len(names) == 1 else f"{shown} ({len(names)} tasks)"


def rest_name(shadow: str | None, count: int) -> str | None:
    """The name of a message's rest, sent back to the queue: the message's names (the names of the
    tasks not yet claimed are not known here; the message's are a superset) with the new count."""
    if not shadow:
        return None
    names = _COUNT_SUFFIX.sub("", shadow)
    return names if count == 1 else f"{names} ({count} tasks)"


# --- publishing -----------------------------------------------------------------------------------------------


def publish_message(
    items: Sequence[Attempt],
    *,
    queue: str,
    time_limit_sec: float | None,
    producer: Any = None,
    retry_policy: dict[str, Any] | None = None,
    shadow: str | None = None,
) -> None:
    """One EXECUTE message carrying `items`, on `queue`, killed by Celery after `time_limit_sec`."""
    celery_app.send_task(
        EXECUTE,
        (encode_attempts(items),),
        queue=queue,
        routing_key=queue,
        time_limit=time_limit_sec,
        producer=producer,
        retry_policy=retry_policy,
        shadow=shadow,
        ignore_result=True,
    )


def publish_attempts(
    items: Iterable[Dispatched],
    *,
    default_timeout_sec: float,
    max_per_message: int = 1,
    producer: Any = None,
    retry_policy: dict[str, Any] | None = None,
) -> int:
    """Publish `(task_id, attempt)` to each task's queue over one producer connection, grouped into
    messages by `messages_for`. `producer` and `retry_policy`: the scheduler's own (see CeleryPublisher)."""
    count = 0
    # A worker that has its outcome in hand keeps retrying the write for WORKER_DB_RETRY_SEC while
    # the database is away: the hard limit must not kill it meanwhile and lose that outcome.
    outcome_write_sec = get_settings().worker_db_retry_sec
    with configure_celery().producer_or_acquire(producer) as producer:
        for chunk in messages_for(items, max_per_message=max_per_message):
            # Celery's hard limit, for a handler that ignores its own (see worker.limits): the slice,
            # the longest task limit in the message, the outcome's write and a grace period.
            longest = max(item.timeout_sec or default_timeout_sec for item in chunk)
            publish_message(
                [(item.id, item.attempt) for item in chunk],
                queue=chunk[0].queue,
                time_limit_sec=MESSAGE_SLICE_SEC + longest + outcome_write_sec + HARD_LIMIT_GRACE_SEC,
                producer=producer,
                retry_policy=retry_policy,
                shadow=message_name([item.name for item in chunk]),
            )
            count += len(chunk)
    return count


def publish_dead(
    items: Iterable[DeadMessage], *, producer: Any = None, retry_policy: dict[str, Any] | None = None
) -> int:
    """Publish one RECORD_DEAD message per item to the DLQ queue."""
    count = 0
    with configure_celery().producer_or_acquire(producer) as producer:
        for item in items:
            celery_app.send_task(
                RECORD_DEAD,
                item.encode(),
                queue=Queue.DLQ.value,
                routing_key=Queue.DLQ.value,
                producer=producer,
                retry_policy=retry_policy,
                shadow=f"dead: {item.name}",
                ignore_result=True,
            )
            count += 1
    return count
