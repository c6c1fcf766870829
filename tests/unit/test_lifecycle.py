import itertools
import random
import statistics

import pytest

from taskscheduler.lifecycle import (
    ALLOWED_TRANSITIONS,
    CANCELLABLE,
    DISPATCHABLE,
    TERMINAL,
    Queue,
    TaskStatus,
    backoff_sec,
    can_transition,
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


def test_every_status_has_a_transition_entry():
    assert set(ALLOWED_TRANSITIONS) == set(TaskStatus)


def test_the_happy_path_and_the_retry_loop_are_allowed():
    path = [
        TaskStatus.PENDING,
        TaskStatus.ENQUEUED,
        TaskStatus.STARTED,
        TaskStatus.FAILED,
        TaskStatus.ENQUEUED,
        TaskStatus.STARTED,
        TaskStatus.SUCCEEDED,
    ]
    assert all(can_transition(a, b) for a, b in itertools.pairwise(path))


def test_nothing_leaves_a_terminal_state_except_an_explicit_retry_to_pending():
    for status in TERMINAL:
        assert ALLOWED_TRANSITIONS[status] <= {TaskStatus.PENDING}
    assert ALLOWED_TRANSITIONS[TaskStatus.SUCCEEDED] == frozenset()


def test_a_started_task_cannot_be_cancelled_or_skip_back():
    assert TaskStatus.STARTED not in CANCELLABLE
    assert not can_transition(TaskStatus.STARTED, TaskStatus.ENQUEUED)
    assert not can_transition(TaskStatus.PENDING, TaskStatus.STARTED)
    assert {TaskStatus.PENDING, TaskStatus.FAILED} == DISPATCHABLE


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
