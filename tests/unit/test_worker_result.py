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
