"""The broker's pure parts: the message format, grouping attempts into messages, their names."""

import uuid

import pytest

from taskscheduler.broker import (
    DeadMessage,
    decode_attempts,
    encode_attempts,
    message_name,
    messages_for,
    rest_name,
)
from taskscheduler.lifecycle import DlqReason
from taskscheduler.store.sweeps import Dispatched


def test_an_execute_message_carries_task_ids_and_attempts_as_json_and_reads_back_the_same():
    items = [(uuid.uuid4(), 1), (uuid.uuid4(), 7)]
    body = encode_attempts(items)
    assert body == [[str(items[0][0]), 1], [str(items[1][0]), 7]]
    assert decode_attempts(body) == items


def test_a_dlq_message_reads_back_the_same():
    dead = DeadMessage(
        task_id=uuid.uuid4(), attempt=3, name="send_email", reason=DlqReason.STUCK_TASK_TIMEOUT, error=None
    )
    args = dead.encode()
    assert args == (str(dead.task_id), 3, "send_email", "stuck_task_timeout", None)
    assert DeadMessage.decode(*args) == dead


def _dispatched(queue: str, count: int) -> list[Dispatched]:
    return [Dispatched(id=uuid.uuid4(), attempt=1, queue=queue, timeout_sec=None) for _ in range(count)]


def test_a_few_due_tasks_go_one_per_message():
    items = _dispatched("default", 8)
    assert messages_for(items, max_per_message=20) == [[item] for item in items]


def test_a_deep_queue_shares_messages_up_to_the_maximum_in_order():
    items = _dispatched("default", 500)
    messages = messages_for(items, max_per_message=20)
    assert [len(m) for m in messages] == [20] * 25
    assert [item for m in messages for item in m] == items


def test_a_batch_is_spread_over_at_least_eight_messages_per_queue():
    items = _dispatched("high", 40) + _dispatched("low", 3)
    messages = messages_for(items, max_per_message=20)
    assert [(m[0].queue, len(m)) for m in messages] == [("high", 5)] * 8 + [("low", 1)] * 3
    assert all(len({item.queue for item in m}) == 1 for m in messages)


def test_one_task_per_message_when_batching_is_off():
    assert [len(m) for m in messages_for(_dispatched("low", 100), max_per_message=1)] == [1] * 100


@pytest.mark.parametrize(
    ("names", "shown"),
    [
        (["send_email"], "send_email"),
        (["send_email"] * 20, "send_email (20 tasks)"),
        (["send_email", "resize", "send_email", "resize", "send_email"], "send_email, resize (5 tasks)"),
        (["a", "b", "c", "d", "a", "e", "a", "a", "a"], "a, b, c +2 more (9 tasks)"),
        ([""], None),  # names unknown: Celery shows the task's own name
    ],
)
def test_a_message_is_named_after_the_handlers_it_carries(names: list[str], shown: str | None) -> None:
    assert message_name(names) == shown


def test_the_rest_of_a_message_keeps_its_names_with_its_own_count() -> None:
    assert rest_name("send_email, resize (20 tasks)", 12) == "send_email, resize (12 tasks)"
    assert rest_name("a, b, c +2 more (9 tasks)", 1) == "a, b, c +2 more"
    assert rest_name(None, 3) is None
