"""What PostgreSQL's jsonb can store and the API can give back, checked in one walk of a JSON value.

The API checks a request's document with it, the worker a handler's result, and a task read back
its stored result: one walk, so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Any


class Unstorable(StrEnum):
    NUL = "nul"  # jsonb refuses the NUL character (\u0000)
    SURROGATE = "surrogate"  # a lone UTF-16 surrogate is not Unicode: UTF-8 cannot encode it
    TOO_DEEP = "too_deep"  # containers nested deeper than the limit


def _walk(value: Any) -> Iterator[tuple[Any, int]]:
    """Every value and dict key in `value` with its container depth (the top value is 0), without
    recursion: a hostile or buggy value of any depth is safe to walk."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        yield item, depth
        if isinstance(item, dict):
            stack.extend((key, depth + 1) for key in item if isinstance(key, str))
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)


def _is_container(item: Any) -> bool:
    return isinstance(item, dict | list | tuple)


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` has containers nested more than `limit` levels deep (a scalar is 0 levels,
    `[1]` one)."""
    return any(depth >= limit and _is_container(item) for item, depth in _walk(value))


def first_unstorable(value: Any, *, max_depth: int) -> Unstorable | None:
    """The first thing found in `value` that jsonb cannot store or that is nested deeper than
    `max_depth` container levels; None if there is none."""
    for item, depth in _walk(value):
        if isinstance(item, str):
            if "\x00" in item:
                return Unstorable.NUL
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return Unstorable.SURROGATE
        elif depth >= max_depth and _is_container(item):
            return Unstorable.TOO_DEEP
    return None
