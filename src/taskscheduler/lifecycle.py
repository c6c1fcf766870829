"""Task statuses, queues, backoff and the failure policy (retry when, or dead why). Pure: no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class TaskStatus(StrEnum):
    PENDING = "PENDING"
    ENQUEUED = "ENQUEUED"
    STARTED = "STARTED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"


TERMINAL: frozenset[TaskStatus] = frozenset({TaskStatus.SUCCEEDED, TaskStatus.DEAD, TaskStatus.CANCELLED})
CANCELLABLE: frozenset[TaskStatus] = frozenset({TaskStatus.PENDING, TaskStatus.FAILED, TaskStatus.ENQUEUED})
RETRYABLE: frozenset[TaskStatus] = frozenset({TaskStatus.DEAD, TaskStatus.CANCELLED})


class Queue(StrEnum):
    HIGH = "high"
    DEFAULT = "default"
    LOW = "low"
    DLQ = "dlq"


TASK_QUEUES: tuple[Queue, ...] = (Queue.HIGH, Queue.DEFAULT, Queue.LOW)
MIN_PRIORITY = 1
MAX_PRIORITY = 10


def queue_for_priority(priority: int) -> Queue:
    """8-10 -> high, 4-7 -> default, 1-3 -> low."""
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {priority}")
    if priority >= 8:
        return Queue.HIGH
    if priority >= 4:
        return Queue.DEFAULT
    return Queue.LOW


class DlqReason(StrEnum):
    MAX_RETRIES_EXCEEDED = "max_retries_exceeded"
    STUCK_TASK_TIMEOUT = "stuck_task_timeout"


def has_retries_left(attempt: int, max_retries: int, retry_base_attempt: int = 0) -> bool:
    """Whether another attempt is allowed after `attempt` failed.

    Attempts are counted from `retry_base_attempt` (the attempt at which an API retry replayed the
    task), so a replay gets a fresh budget without resetting `attempt`, the fencing token.
    """
    return attempt - retry_base_attempt < max_retries + 1


def backoff_sec(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))].

    Full jitter spreads a burst of failures over the whole window instead of retrying in lockstep.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    return (rng or random).uniform(0.0, ceiling)


@dataclass(frozen=True)
class RetryAfter:
    """The failed attempt is retried: FAILED, due again in `delay_sec`."""

    delay_sec: float


@dataclass(frozen=True)
class DeadWith:
    """The failed attempt was the last one allowed: DEAD, for `reason`."""

    reason: DlqReason


def failure_outcome(
    *,
    attempt: int,
    max_retries: int,
    retry_base_attempt: int,
    timed_out: bool,
    backoff_base_sec: float,
    backoff_max_sec: float,
    rng: random.Random | None = None,
) -> RetryAfter | DeadWith:
    """What a failed attempt becomes, whoever saw it fail: the worker (the handler raised or ran past
    its time limit) or the stuck sweep (no heartbeat, or past its time limit: `timed_out`).

    A retry waits a jittered backoff counted from the last replay; a task out of retries is DEAD for
    its timeout if it timed out, else for running out of retries.
    """
    if has_retries_left(attempt, max_retries, retry_base_attempt):
        return RetryAfter(
            backoff_sec(attempt - retry_base_attempt, base=backoff_base_sec, cap=backoff_max_sec, rng=rng)
        )
    return DeadWith(DlqReason.STUCK_TASK_TIMEOUT if timed_out else DlqReason.MAX_RETRIES_EXCEEDED)
