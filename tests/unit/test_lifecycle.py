import random
import statistics

import pytest

from taskscheduler.lifecycle import (
    CANCELLABLE,
    DeadWith,
    DlqReason,
    Queue,
    RetryAfter,
    TaskStatus,
    backoff_sec,
    failure_outcome,
    has_retries_left,
    queue_for_priority,
)


@pytest.mark.parametrize(
    ("priority", "queue"),
    [(10, Queue.HIGH), (8, Queue.HIGH), (7, Queue.DEFAULT), (4, Queue.DEFAULT), (3, Queue.LOW), (1, Queue.LOW)],
)
def test_queue_for_priority(priority, queue):
    assert queue_for_priority(priority) is queue


@pytest.mark.parametrize("priority", [0, 11, -1])
def test_queue_for_priority_out_of_range(priority):
    with pytest.raises(ValueError, match="between 1 and 10"):
        queue_for_priority(priority)


def test_a_started_task_cannot_be_cancelled():
    assert TaskStatus.STARTED not in CANCELLABLE


def test_retry_budget_counts_attempts_from_the_last_replay():
    # max_retries=1: attempts 1 and 2 are allowed, so after attempt 1 one retry is left, after 2 none.
    assert has_retries_left(1, 1)
    assert not has_retries_left(2, 1)
    assert not has_retries_left(1, 0)
    # Replayed at attempt 5 with max_retries=1: attempts 6 and 7.
    assert has_retries_left(6, 1, retry_base_attempt=5)
    assert not has_retries_left(7, 1, retry_base_attempt=5)


def test_backoff_stays_within_the_exponential_ceiling_and_the_cap():
    rng = random.Random(1)
    for attempt in range(1, 30):
        ceiling = min(60.0, 2.0 * 2 ** (attempt - 1))
        for _ in range(50):
            assert 0.0 <= backoff_sec(attempt, base=2.0, cap=60.0, rng=rng) <= ceiling


def test_backoff_is_fully_jittered_not_a_spike():
    rng = random.Random(7)
    delays = [backoff_sec(6, base=2.0, cap=300.0, rng=rng) for _ in range(2000)]
    # Uniform over [0, 64]: mean ~32, spread across the whole window.
    assert 28 < statistics.mean(delays) < 36
    assert min(delays) < 4 and max(delays) > 60
    assert len({round(d, 3) for d in delays}) > 1900


def test_backoff_huge_attempt_does_not_overflow():
    assert backoff_sec(10_000, base=2.0, cap=300.0) <= 300.0


def test_backoff_rejects_attempt_zero():
    with pytest.raises(ValueError):
        backoff_sec(0, base=1, cap=1)


def _outcome(attempt: int, *, max_retries: int, retry_base_attempt: int = 0, timed_out: bool = False):
    return failure_outcome(
        attempt=attempt,
        max_retries=max_retries,
        retry_base_attempt=retry_base_attempt,
        timed_out=timed_out,
        backoff_base_sec=2.0,
        backoff_max_sec=60.0,
        rng=random.Random(3),
    )


def test_a_failure_with_retries_left_is_retried_after_a_backoff_counted_from_the_last_replay():
    first = _outcome(1, max_retries=2)
    assert isinstance(first, RetryAfter) and 0.0 <= first.delay_sec <= 2.0
    # Replayed at attempt 5: attempt 7 is its second, so its ceiling is base * 2.
    replayed = _outcome(7, max_retries=2, retry_base_attempt=5, timed_out=True)
    assert isinstance(replayed, RetryAfter) and 0.0 <= replayed.delay_sec <= 4.0
    assert _outcome(1, max_retries=2) == first  # the same draw: pure but for its rng


def test_a_failure_out_of_retries_is_dead_for_its_timeout_or_for_running_out_of_retries():
    assert _outcome(2, max_retries=1) == DeadWith(DlqReason.MAX_RETRIES_EXCEEDED)
    assert _outcome(2, max_retries=1, timed_out=True) == DeadWith(DlqReason.STUCK_TASK_TIMEOUT)
    assert _outcome(1, max_retries=0) == DeadWith(DlqReason.MAX_RETRIES_EXCEEDED)
    assert _outcome(8, max_retries=1, retry_base_attempt=5, timed_out=True) == DeadWith(DlqReason.STUCK_TASK_TIMEOUT)
