"""The worker's pure parts: storable results and error texts, the per-task time limit, the message
slice."""

import math
import signal
import time
import uuid
from typing import Any

import pytest

from taskscheduler.config import MAX_JSON_DEPTH
from taskscheduler.jsonb import nested_deeper_than
from taskscheduler.store.transitions import MAX_ERROR_CHARS, storable_error
from taskscheduler.worker.results import ResultNotStorable, error_text, storable_result

MiB = 1024 * 1024


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, "x"]},
        None,
        "text",
        {"escaped": "\\u0000 is just text here"},
        {"café": "naïve ☕ 𝄞"},
        _nested(MAX_JSON_DEPTH),
    ],
)
def test_storable_results_pass(value):
    assert storable_result(value, max_bytes=MiB) == value


@pytest.mark.parametrize(
    "value",
    [
        {"x": math.nan},
        {"x": math.inf},
        {"s": "nul\x00"},
        {"k\x00": 1},
        {"obj": object()},
        {1, 2},
        "caf\udce9",
        {"caf\udce9": 1},
        ["ok", {"deep": ["\ud800"]}],
        _nested(MAX_JSON_DEPTH + 1),
        _nested(300),
        _nested(100_000),
    ],
    ids=["nan", "inf", "nul", "nul-key", "object", "set", "surrogate", "surrogate-key", "surrogate-inside",
         "depth-65", "depth-300", "depth-100000"],
)  # fmt: skip
def test_unstorable_results_fail_the_attempt(value):
    with pytest.raises(ResultNotStorable, match="result"):
        storable_result(value, max_bytes=MiB)


def test_a_result_over_max_result_bytes_fails_the_attempt():
    # Counted as UTF-8 JSON: 2 bytes per "é", plus the quotes.
    assert storable_result("é" * 511, max_bytes=1024) == "é" * 511
    with pytest.raises(ResultNotStorable, match=r"1026 bytes as JSON, over MAX_RESULT_BYTES \(1024\)"):
        storable_result("é" * 512, max_bytes=1024)
    with pytest.raises(ResultNotStorable, match="MAX_RESULT_BYTES"):
        storable_result({"blob": "x" * (3 * MiB)}, max_bytes=MiB)


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("plain", "plain"),
        ("a\x00b", "a\\x00b"),
        ("caf\udce9", "caf\\udce9"),
        ("naïve ☕", "naïve ☕"),
        (None, None),
    ],
)
def test_error_texts_are_stored_with_nul_and_lone_surrogates_escaped(raw, stored):
    assert storable_error(raw) == stored


def test_error_texts_are_clipped_to_max_error_chars_after_escaping():
    assert storable_error("x" * 1_000_014) == "x" * MAX_ERROR_CHARS
    escaped = storable_error("\x00" * MAX_ERROR_CHARS)
    assert escaped is not None and len(escaped) == MAX_ERROR_CHARS and "\x00" not in escaped


def test_an_exception_whose_message_cannot_be_read_still_gives_an_error_text():
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert error_text(Broken()) == "Broken: <the exception's message could not be read>"
    assert error_text(KeyError("k")) == "KeyError: 'k'"


def test_nested_deeper_than_counts_container_levels():
    assert not nested_deeper_than("scalar", 0)
    assert not nested_deeper_than(_nested(MAX_JSON_DEPTH), MAX_JSON_DEPTH)
    assert nested_deeper_than(_nested(MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH)
    assert nested_deeper_than({"a": [1, {"b": _nested(100_000)}]}, MAX_JSON_DEPTH)


def test_a_handler_past_its_time_limit_is_interrupted():
    from taskscheduler.worker.limits import AttemptTimedOut, time_limit

    started = time.monotonic()
    with pytest.raises(AttemptTimedOut), time_limit(0.2):
        time.sleep(10)
    assert time.monotonic() - started < 5


def test_the_time_limit_is_disarmed_once_the_handler_returns():
    # Nothing may interrupt the outcome's write that follows the handler.
    from taskscheduler.worker.limits import time_limit

    previous = signal.getsignal(signal.SIGALRM)
    with time_limit(0.2):
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is previous
    time.sleep(0.4)  # past the limit: no AttemptTimedOut


def _items(count):
    return [(uuid.uuid4(), 1) for _ in range(count)]


def test_a_message_slice_hands_each_attempt_to_the_loop_or_to_the_hand_off_never_both():
    # The loop and the slicer race for the same message, many times: every attempt is run or sent
    # back, none both, the rest is sent at most once and never includes the first.
    import threading

    from taskscheduler.worker.slicing import MessageSlice

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
    from taskscheduler.worker.slicing import MessageSlice

    sent = []
    message = MessageSlice(_items(3), deadline=time.monotonic(), send_back=sent.append)
    assert message.take() is not None
    message.close()  # e.g. the attempt raised and the message ended with attempts left
    message.hand_off()
    assert message.take() is None
    assert sent == []


def test_the_slicer_hands_off_the_rest_at_the_deadline_while_the_block_runs():
    import threading

    from taskscheduler.worker.slicing import MessageSlice, Slicer

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
    from taskscheduler.worker.slicing import MessageSlice, Slicer

    sent = []
    slicer = Slicer()
    message = MessageSlice(_items(2), deadline=time.monotonic() + 3600, send_back=sent.append)
    with slicer.watching(message):
        assert message.take() is not None
    assert slicer._watched == []
    message.hand_off()  # what the slicer would do at the deadline: nothing, the message is over
    assert sent == []
