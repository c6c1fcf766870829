"""A handler's result must be storable in jsonb, or the attempt fails with a clear error."""

import math

import pytest

from taskscheduler.worker import _json_result


@pytest.mark.parametrize("value", [{"a": [1, "x"]}, None, "text", {"escaped": "\\u0000 is just text here"}])
def test_storable_results_pass(value):
    assert _json_result(value) == value


@pytest.mark.parametrize(
    "value", [{"x": math.nan}, {"x": math.inf}, {"s": "nul\x00"}, {"k\x00": 1}, {"obj": object()}, {1, 2}]
)
def test_unstorable_results_fail_the_attempt(value):
    with pytest.raises(ValueError, match="result"):
        _json_result(value)


def test_a_soft_time_limit_arriving_while_the_outcome_is_written_is_held_back_then_dropped():
    import os
    import signal

    from billiard.pool import SIG_SOFT_TIMEOUT
    from celery.exceptions import SoftTimeLimitExceeded

    from taskscheduler.worker import _soft_time_limit_held_back

    def soft_limit(signum, frame):  # type: ignore[no-untyped-def]  # what billiard's pool installs
        raise SoftTimeLimitExceeded()

    previous = signal.signal(SIG_SOFT_TIMEOUT, soft_limit)
    try:
        written = []
        with _soft_time_limit_held_back():
            os.kill(os.getpid(), SIG_SOFT_TIMEOUT)  # the limit lands mid-write ...
            written.append("outcome")  # ... and the write still completes
        assert written == ["outcome"]
        # Outside, the limit works as before.
        with pytest.raises(SoftTimeLimitExceeded):
            os.kill(os.getpid(), SIG_SOFT_TIMEOUT)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set())  # a point where handlers run
    finally:
        signal.signal(SIG_SOFT_TIMEOUT, previous)
