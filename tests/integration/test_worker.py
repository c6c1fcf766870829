"""The worker's side of a message: several attempts in one message, each claimed as it starts, and
each task's own time limit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest
from tests.helpers import dispatch_all, events, new_task, task_row

from taskscheduler import worker

pytestmark = pytest.mark.usefixtures("settings")


def _dispatched(count: int) -> list[tuple[uuid.UUID, int]]:
    ids = {new_task() for _ in range(count)}
    return [(item.id, item.attempt) for item in dispatch_all() if item.id in ids]


def test_a_message_runs_each_of_its_attempts() -> None:
    items = _dispatched(3)
    assert worker.run_attempts(items) == ["succeeded"] * 3
    assert [task_row(task_id)["status"] for task_id, _ in items] == ["SUCCEEDED"] * 3


def test_attempts_not_started_when_the_slice_ends_go_back_to_the_queue_unclaimed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "MESSAGE_SLICE_SEC", 0.0)
    items = _dispatched(3)
    sent_back: list[Sequence[tuple[uuid.UUID, int]]] = []
    assert worker.run_attempts(items, send_back=sent_back.append) == ["succeeded"]
    assert sent_back == [items[1:]]
    for task_id, _ in items[1:]:
        assert task_row(task_id)["status"] == "ENQUEUED"
        assert "STARTED" not in [to for _, to, _ in events(task_id)]
    # The message sent back runs them.
    assert worker.run_attempts(sent_back[0]) == ["succeeded"] * 2


def test_when_the_rest_cannot_be_sent_back_it_stays_enqueued_for_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "MESSAGE_SLICE_SEC", 0.0)
    items = _dispatched(2)

    def broker_down(rest: Sequence[tuple[uuid.UUID, int]]) -> None:
        raise ConnectionError("broker down")

    assert worker.run_attempts(items, send_back=broker_down) == ["succeeded"]
    assert task_row(items[1][0])["status"] == "ENQUEUED"


def test_the_rest_is_sent_back_once_while_a_slow_first_attempt_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "MESSAGE_SLICE_SEC", 0.2)
    slow = new_task(name="demo_hang", payload={"sleep_sec": 2})
    ids = [slow, *(new_task() for _ in range(3))]
    attempts = {item.id: item.attempt for item in dispatch_all()}
    items = [(task_id, attempts[task_id]) for task_id in ids]
    sent_back: list[tuple[Sequence[tuple[uuid.UUID, int]], str]] = []

    def send_back(rest: Sequence[tuple[uuid.UUID, int]]) -> None:
        sent_back.append((rest, task_row(slow)["status"]))

    assert worker.run_attempts(items, send_back=send_back) == ["succeeded"]
    # Sent once, while the slow attempt was still running, and none of them also run here.
    assert sent_back == [(items[1:], "STARTED")]
    for task_id, _ in items[1:]:
        assert task_row(task_id)["status"] == "ENQUEUED"
        assert "STARTED" not in [to for _, to, _ in events(task_id)]


def test_a_handler_past_its_task_timeout_fails_the_attempt() -> None:
    task_id = new_task(name="demo_hang", payload={"sleep_sec": 30}, timeout_sec=0.3, max_retries=1)
    (item,) = [d for d in dispatch_all() if d.id == task_id]
    assert worker.run_attempt(task_id, item.attempt) == "failed"
    row = task_row(task_id)
    assert row["status"] == "FAILED" and row["last_error"] == "timed out after 0.3s"
    # The next attempt times out too and, with no retries left, is DEAD for its timeout.
    (item,) = [d for d in dispatch_all() if d.id == task_id]
    assert worker.run_attempt(task_id, item.attempt) == "dead"
    assert task_row(task_id)["dead_reason"] == "stuck_task_timeout"
