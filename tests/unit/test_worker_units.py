"""The worker's pure parts: storable results, the per-task time limit, grouping attempts into messages."""

import math
import signal
import time
import uuid

import pytest

from taskscheduler.store.tasks import Dispatched
from taskscheduler.worker import _json_result, messages_for


@pytest.mark.parametrize("value", [{"a": [1, "x"]}, None, "text", {"escaped": "\\u0000 is just text here"}])
def test_storable_results_pass(value):
    assert _json_result(value) == value


@pytest.mark.parametrize(
    "value", [{"x": math.nan}, {"x": math.inf}, {"s": "nul\x00"}, {"k\x00": 1}, {"obj": object()}, {1, 2}]
)
def test_unstorable_results_fail_the_attempt(value):
    with pytest.raises(ValueError, match="result"):
        _json_result(value)


def test_a_handler_past_its_time_limit_is_interrupted():
    from taskscheduler.worker import AttemptTimedOut, _time_limit

    started = time.monotonic()
    with pytest.raises(AttemptTimedOut), _time_limit(0.2):
        time.sleep(10)
    assert time.monotonic() - started < 5


def test_the_time_limit_is_disarmed_once_the_handler_returns():
    # Nothing may interrupt the outcome's write that follows the handler.
    from taskscheduler.worker import _time_limit

    previous = signal.getsignal(signal.SIGALRM)
    with _time_limit(0.2):
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is previous
    time.sleep(0.4)  # past the limit: no AttemptTimedOut


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


def _items(count):
    return [(uuid.uuid4(), 1) for _ in range(count)]


def test_a_message_slice_hands_each_attempt_to_the_loop_or_to_the_hand_off_never_both():
    # The loop and the slicer race for the same message, many times: every attempt is run or sent
    # back, none both, the rest is sent at most once and never includes the first.
    import threading

    from taskscheduler.worker import MessageSlice

    for _ in range(300):
        items = _items(20)
        sent: list[list[tuple[uuid.UUID, int]]] = []
        message = MessageSlice(items, deadline=time.monotonic() + 0.0005, send_back=sent.append)
        taken: list[tuple[uuid.UUID, int]] = []

        def loop(message=message, taken=taken):
            while (item := message.take()) is not None:
                taken.append(item)

        threads = [threading.Thread(target=loop), threading.Thread(target=message.hand_off)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        message.close()
        assert len(sent) <= 1
        assert taken[0] == items[0]
        assert taken + (sent[0] if sent else []) == items


def test_no_hand_off_after_the_message_is_closed():
    from taskscheduler.worker import MessageSlice

    sent = []
    message = MessageSlice(_items(3), deadline=time.monotonic(), send_back=sent.append)
    assert message.take() is not None
    message.close()  # e.g. the attempt raised and the message ended with attempts left
    message.hand_off()
    assert message.take() is None
    assert sent == []


def test_the_slicer_hands_off_the_rest_at_the_deadline_while_the_block_runs():
    import threading

    from taskscheduler.worker import MessageSlice, Slicer

    items = _items(3)
    sent = threading.Event()
    rest: list[list[tuple[uuid.UUID, int]]] = []
    message = MessageSlice(
        items, deadline=time.monotonic() + 0.1, send_back=lambda r: (rest.append(list(r)), sent.set())
    )
    slicer = Slicer()
    with slicer.watching(message):
        assert message.take() == items[0]
        assert sent.wait(10), "the slicer did not hand the rest off"  # while the "attempt" still runs
    assert rest == [items[1:]]
    assert message.take() is None


def test_the_slicer_forgets_a_message_that_ended_before_its_deadline():
    from taskscheduler.worker import MessageSlice, Slicer

    sent = []
    slicer = Slicer()
    message = MessageSlice(_items(2), deadline=time.monotonic() + 3600, send_back=sent.append)
    with slicer.watching(message):
        assert message.take() is not None
    assert slicer._watched == []
    message.hand_off()  # what the slicer would do at the deadline: nothing, the message is over
    assert sent == []
