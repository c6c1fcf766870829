"""An ASGI guard in front of the routes: body size (413), content type (415) and strict JSON (422).

Python's json module reads things that are not JSON, or that PostgreSQL cannot store: NaN and
Infinity, numbers too large for a float (1e400 becomes inf), lone UTF-16 surrogates ("\\ud800"),
NUL characters ("\\u0000", refused by jsonb and text columns), and nesting deeper than a task's
response can be serialised. Any of them would reach the database or the response and end as a
500 (or as a task that can never be read back); catching them here makes it a clear 422.
Plain syntax errors pass through, so FastAPI reports them with their position.

A large body is checked and parsed once, in a worker thread: parsing 256 KiB of JSON takes tens of
milliseconds, during which an event loop would answer nothing else (twenty clients sending such
bodies held /healthz for seconds). The parsed document goes to the routes through the request
scope (`PreparsedJsonRoute`), so FastAPI does not parse it again on the loop.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskscheduler.config import MAX_JSON_DEPTH
from taskscheduler.jsonb import Unstorable, first_unstorable

_BODY_METHODS = {"POST", "PUT", "PATCH"}
# Python's own limit for converting a digit string to int (sys.get_int_max_str_digits()).
_MAX_INT_DIGITS = 4300
# Bodies above this are checked and parsed in a worker thread. Below it, the thread hop costs more
# than the work it moves (a typical task is a few hundred bytes; this parses in well under 1 ms).
OFF_LOOP_BYTES = 16 * 1024
# Where BodyGuard leaves the parsed document of a large body for PreparsedJsonRequest.
SCOPE_KEY = "taskscheduler.parsed_json"


class NotStrictJSON(ValueError):
    """Parsed by Python's json module, but not strict JSON that PostgreSQL can store."""


def _reject_constant(name: str) -> Any:
    raise NotStrictJSON(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotStrictJSON(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        raise NotStrictJSON(f"integer with {digits} digits is too long (at most {_MAX_INT_DIGITS})")
    return int(text)


_PROBLEMS = {
    Unstorable.NUL: "the NUL character (\\u0000) is not supported",
    Unstorable.SURROGATE: "lone UTF-16 surrogates (e.g. \\ud800) are not valid Unicode",
    Unstorable.TOO_DEEP: f"nested deeper than {MAX_JSON_DEPTH} levels",
}


# Outside strings, anything that may be a non-finite or oversized number: NaN, Infinity, an
# exponent (1e400), or a run of digits long enough to overflow a float or to be a huge integer.
_RISKY_OUTSIDE_STRINGS = re.compile(rb"NaN|Infinity|[0-9][eE]|[0-9]{16}")
# A JSON string with no escapes (the caller has made sure the body has no backslash).
_PLAIN_STRING = re.compile(rb'"[^"]*"')
_BRACKETS_AS_BRACES = bytes.maketrans(b"[]", b"{}")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}[]")


def _plainly_strict(body: bytes) -> bool:
    """True when `body` cannot hold anything `check_strict_json` refuses, decided from its bytes
    without parsing it: ASCII (valid UTF-8, no surrogates), no backslash (so no escapes such as
    \\u0000 or \\ud800), no NUL, no risky number, nesting at most MAX_JSON_DEPTH. False means only
    "parse it to be sure". Malformed JSON may pass; FastAPI's parser reports it."""
    if not body.isascii() or b"\\" in body or b"\x00" in body:
        return False
    outside_strings = _PLAIN_STRING.sub(b"", body)
    if _RISKY_OUTSIDE_STRINGS.search(outside_strings):
        return False
    # Only the brackets, one kind: each pass removes the innermost level of nesting.
    brackets = outside_strings.translate(_BRACKETS_AS_BRACES, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):
        if not brackets:
            return True
        brackets = brackets.replace(b"{}", b"")
    return not brackets


def check_strict_json(body: bytes) -> None:
    """Raise NotStrictJSON (or json.JSONDecodeError for a syntax error) unless `body` is strict JSON."""
    # Typical bodies pass the byte-level check; parsing with Python hooks for every number and
    # walking every string cost more than the route's own work on a large batch.
    if _plainly_strict(body):
        return
    _parse_strict(body)


def parse_strict_json(body: bytes) -> Any:
    """The document `body` holds; raises as `check_strict_json` does."""
    if _plainly_strict(body):
        return json.loads(body)
    return _parse_strict(body)


def _parse_strict(body: bytes) -> Any:
    try:
        document = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise NotStrictJSON(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (NotStrictJSON, json.JSONDecodeError):
        raise
    except ValueError as exc:  # bytes that are not UTF-8/16/32
        raise NotStrictJSON(str(exc)) from None
    problem = first_unstorable(document, max_depth=MAX_JSON_DEPTH)
    if problem is not None:
        raise NotStrictJSON(_PROBLEMS[problem])
    return document


class BodyGuard:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # One large body parsed at a time: the parse holds the GIL, so every thread parsing beside
        # it would be one more the event loop waits behind. Created on the loop, at first use.
        self._parsers: anyio.CapacityLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._reject(scope, receive, send, 413, f"request body over {self.max_body_bytes} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(scope, receive, send, 413, f"request body over {self.max_body_bytes} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body:
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json" and not content_type.endswith("+json"):
                detail = f"Content-Type must be application/json, got {content_type or 'none'!r}"
                await self._reject(scope, receive, send, 415, detail)
                return
            try:
                if len(body) > OFF_LOOP_BYTES:
                    if self._parsers is None:
                        self._parsers = anyio.CapacityLimiter(1)
                    parsed = await anyio.to_thread.run_sync(parse_strict_json, body, limiter=self._parsers)
                    scope[SCOPE_KEY] = parsed
                else:
                    check_strict_json(body)
            except NotStrictJSON as exc:
                # Shaped like FastAPI's own 422s, so every 422 matches the documented schema.
                errors = [{"loc": ["body"], "msg": f"invalid JSON: {exc}", "type": "json_invalid"}]
                await self._reject(scope, receive, send, 422, errors)
                return
            except json.JSONDecodeError:
                pass  # FastAPI reports the syntax error, with its position

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, status: int, detail: object) -> None:
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


class PreparsedJsonRequest(Request):
    async def json(self) -> Any:
        if SCOPE_KEY in self.scope:
            return self.scope[SCOPE_KEY]
        return await super().json()


class PreparsedJsonRoute(APIRoute):
    """A route whose body, when BodyGuard has parsed it already, is not parsed a second time."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(PreparsedJsonRequest(request.scope, request.receive))

        return handle
