"""What a handler's run leaves to store: its result, checked, or its exception as an error text."""

from __future__ import annotations

import json
from typing import Any

from taskscheduler.config import MAX_JSON_DEPTH
from taskscheduler.jsonb import Unstorable, first_unstorable


class ResultNotStorable(ValueError):
    """The handler's result cannot be stored as it is; the attempt fails with this error."""


def storable_result(value: Any, *, max_bytes: int) -> Any:
    """The handler's result, if PostgreSQL's jsonb can store it and the API can give it back: JSON
    (no NaN or infinity), no NUL character, valid Unicode (no lone surrogate), nested at most
    MAX_JSON_DEPTH levels deep (the payload's limit) and at most `max_bytes` as UTF-8 JSON. Else
    ResultNotStorable, which fails the attempt."""
    problem = first_unstorable(value, max_depth=MAX_JSON_DEPTH)
    if problem is not None:
        raise ResultNotStorable(f"the handler's result {_PROBLEMS[problem]}")
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ResultNotStorable(f"the handler's result is not JSON-serialisable: {exc}") from None
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        raise ResultNotStorable(
            f"the handler's result is {size} bytes as JSON, over MAX_RESULT_BYTES ({max_bytes}): store large"
            " data elsewhere and return a reference to it"
        )
    return value


_PROBLEMS = {
    Unstorable.NUL: "contains a NUL character, which PostgreSQL cannot store",
    Unstorable.SURROGATE: "contains a lone UTF-16 surrogate (not valid Unicode), which PostgreSQL cannot store",
    Unstorable.TOO_DEEP: f"is nested deeper than {MAX_JSON_DEPTH} levels",
}


def error_text(exc: BaseException) -> str:
    """`Type: message` of a handler's exception, even when its __str__ itself fails."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not lose the failure it describes
        message = "<the exception's message could not be read>"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
