"""explain.explain: the reasons a task is not running, from its row and its queue's facts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from taskscheduler.explain import QueueFacts, ReasonCode, duration, explain, refill_at

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def facts(**changes: Any) -> QueueFacts:
    values: dict[str, Any] = {
        "now": NOW,
        "queue": "default",
        "unclaimed": 0,
        "max_enqueued": 2000,
        "refill_at": 500,
        "live_workers": 1,
        "live_schedulers": 1,
        "stale_after_sec": 30.0,
        "enqueue_timeout_sec": 60.0,
        "due_ahead": 0,
        "due_ahead_cap": 10_000,
    }
    values.update(changes)
    return QueueFacts(**values)


def task(status: str = "PENDING", **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": uuid.uuid4(),
        "status": status,
        "queue": "default",
        "priority": 5,
        "run_at": NOW,
        "attempt": 0,
        "max_retries": 3,
        "retry_base_attempt": 0,
        "last_error": None,
        "dead_reason": None,
        "published_at": None,
        "started_at": None,
    }
    row.update(changes)
    return row


def codes(reasons: list[Any]) -> list[ReasonCode]:
    return [r.code for r in reasons]


def test_a_future_task_waits_for_its_run_at_and_says_how_long() -> None:
    (reason,) = explain(task(run_at=NOW + timedelta(minutes=3, seconds=20)), facts())
    assert reason.code == ReasonCode.WAITING_FOR_RUN_AT
    assert "in 3 min 20 s" in reason.message
    assert reason.until == NOW + timedelta(minutes=3, seconds=20)


def test_a_failed_task_waits_out_its_backoff_and_names_its_error() -> None:
    row = task("FAILED", attempt=2, run_at=NOW + timedelta(seconds=90), last_error="ValueError: boom\ntraceback")
    (reason,) = explain(row, facts())
    assert reason.code == ReasonCode.RETRY_BACKOFF
    assert "attempt 2 failed: ValueError: boom;" in reason.message
    assert "retry 2 of 3" in reason.message and "in 1 min 30 s" in reason.message
    assert "traceback" not in reason.message


def test_a_due_task_on_a_full_queue_is_held_back_by_back_pressure() -> None:
    reasons = explain(task(), facts(unclaimed=1800, max_enqueued=2000, refill_at=500))
    assert codes(reasons) == [ReasonCode.QUEUE_BACKPRESSURE]
    assert "1,800 tasks unclaimed" in reasons[0].message and "taken 300" in reasons[0].message


def test_a_queue_with_room_below_the_refill_mark_is_still_held_back_and_above_it_is_not() -> None:
    assert codes(explain(task(), facts(unclaimed=1501, refill_at=500))) == [ReasonCode.QUEUE_BACKPRESSURE]
    assert codes(explain(task(), facts(unclaimed=1500, refill_at=500))) == [ReasonCode.DUE_NOW]


def test_a_due_task_with_no_scheduler_and_no_worker_gets_both_reasons() -> None:
    reasons = explain(task(), facts(live_schedulers=0, live_workers=0))
    assert codes(reasons) == [ReasonCode.NO_LIVE_SCHEDULER, ReasonCode.NO_LIVE_WORKER]
    assert "taskscheduler worker --queues default" in reasons[1].message


def test_a_future_task_is_told_about_a_missing_worker_too() -> None:
    reasons = explain(task(run_at=NOW + timedelta(hours=2)), facts(live_workers=0))
    assert codes(reasons) == [ReasonCode.WAITING_FOR_RUN_AT, ReasonCode.NO_LIVE_WORKER]


def test_due_tasks_ahead_are_counted_and_a_capped_count_says_at_least() -> None:
    (reason,) = explain(task(), facts(due_ahead=12))
    assert reason.code == ReasonCode.BEHIND_DUE_TASKS and reason.message.startswith("12 due tasks")
    (reason,) = explain(task(), facts(due_ahead=10_000, due_ahead_cap=10_000))
    assert reason.message.startswith("at least 10,000 due tasks")


def test_a_due_task_with_nothing_in_its_way_waits_for_the_next_pass() -> None:
    (reason,) = explain(task(run_at=NOW - timedelta(seconds=2)), facts())
    assert reason.code == ReasonCode.DUE_NOW and "2.0 s" in reason.message


def test_an_enqueued_task_waits_for_a_worker_and_may_have_lost_its_message() -> None:
    row = task("ENQUEUED", attempt=1, published_at=NOW - timedelta(seconds=5))
    (reason,) = explain(row, facts(unclaimed=4, live_workers=2))
    assert reason.code == ReasonCode.WAITING_FOR_WORKER
    assert "2 workers consume queue default" in reason.message and "3 other tasks" in reason.message
    late = task("ENQUEUED", attempt=1, published_at=NOW - timedelta(seconds=61))
    assert codes(explain(late, facts(unclaimed=1))) == [ReasonCode.WAITING_FOR_WORKER, ReasonCode.MESSAGE_MAYBE_LOST]
    assert codes(explain(late, facts(unclaimed=1, live_workers=0))) == [
        ReasonCode.NO_LIVE_WORKER,
        ReasonCode.MESSAGE_MAYBE_LOST,
    ]


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [
        ("STARTED", ReasonCode.RUNNING, "it is running: attempt 1 started 12 s ago"),
        ("SUCCEEDED", ReasonCode.FINISHED, "SUCCEEDED"),
        ("DEAD", ReasonCode.FINISHED, "DEAD (stuck_task_timeout)"),
        ("CANCELLED", ReasonCode.FINISHED, "CANCELLED"),
    ],
)
def test_a_running_or_finished_task_gets_one_reason_that_says_so(status: str, code: ReasonCode, words: str) -> None:
    row = task(status, attempt=1, started_at=NOW - timedelta(seconds=12), dead_reason="stuck_task_timeout")
    (reason,) = explain(row, facts(live_workers=0, live_schedulers=0))
    assert reason.code == code and words in reason.message


def test_durations_read_as_people_say_them() -> None:
    assert [duration(s) for s in (0.25, 9.94, 42, 200, 7500, 200_000)] == [
        "250 ms",
        "9.9 s",
        "42 s",
        "3 min 20 s",
        "2 h 5 min",
        "2 d 7 h",
    ]
    assert [duration(s) for s in (60, 300, 3600, 86_400)] == ["1 min", "5 min", "1 h", "1 d"]


def test_refill_at_is_a_quarter_of_the_queue_bounded_by_a_batch() -> None:
    assert refill_at(500, 2000) == 500
    assert refill_at(100, 2000) == 100
    assert refill_at(500, 1) == 1


def test_one_is_one_task() -> None:
    (held,) = explain(task(), facts(unclaimed=1, max_enqueued=1, refill_at=1))
    assert "it has 1 task unclaimed" in held.message
    (ahead,) = explain(task(), facts(due_ahead=1))
    assert ahead.message.startswith("1 due task of queue default goes first")
    waiting = explain(task("ENQUEUED", attempt=1, published_at=NOW), facts(unclaimed=2))
    assert "1 other task of the queue is unclaimed too" in waiting[0].message
