"""Pure pieces of the operations features: durations, API errors for people, cursors, request hashes, keys."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import HTTPException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from taskscheduler.api.schemas import TaskCreate
from taskscheduler.api.tasks import decode_cursor, encode_cursor
from taskscheduler.auth import RefusalLog, bearer_ok, is_loopback, warn_if_open
from taskscheduler.client import ClientError, describe_error, parse_duration
from taskscheduler.config import Settings
from taskscheduler.metrics import TaskCountCollector


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10", 10), ("10s", 10), ("1.5m", 90), ("2h", 7200), ("1h30m", 5400), ("500ms", 0.5), ("1d", 86400),
     (" 1H 30M ", 5400), ("0s", 0)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "soon", "10x", "-5s", "1h30", "s", "1.s", "10 seconds"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ClientError, match="invalid duration"):
        parse_duration(text)


def _response(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request("GET", "http://x/tasks"))


def test_errors_for_people() -> None:
    assert describe_error(_response(404, {"detail": "task x not found"})) == "HTTP 404: task x not found"
    validation = {"detail": [{"loc": ["body", "name"], "msg": "unknown"}, {"loc": ["query", "limit"], "msg": "big"}]}
    assert describe_error(_response(422, validation)) == "HTTP 422: name: unknown; limit: big"
    assert "--api-key" in describe_error(_response(401, {"detail": "invalid API key"}))
    html = httpx.Response(502, text="<html>bad gateway</html>", request=httpx.Request("GET", "http://x/"))
    assert describe_error(html) == "HTTP 502: <html>bad gateway</html>"


def test_cursor_round_trip() -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    task_id = uuid.uuid4()
    cursor = encode_cursor(moment, task_id)
    assert "=" not in cursor
    assert decode_cursor(cursor) == (moment, task_id)


def _b64(raw: str | bytes) -> str:
    return base64.urlsafe_b64encode(raw.encode() if isinstance(raw, str) else raw).decode().rstrip("=")


_ID = "7d4a1b3c-0e5f-4a6b-8c9d-0e1f2a3b4c5d"
_TIME = "2030-01-01T00:00:00+00:00"


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param(text, id=text or "empty")
        for text in ("", "%%%", "é", "\x00", "bm90IGpzb24", "WzEsIDJd", "WyIyMDMwLTAxLTAxVDAwOjAwOjAwIiwgIngiXQ")
    ]
    + [
        pytest.param(_b64(raw), id=name)
        for name, raw in [
            ("time-and-int", f'["{_TIME}", 5]'),  # was an AttributeError, a 500
            ("one-int", "[1]"),
            ("time-and-list", f'["{_TIME}", ["{_ID}"]]'),
            ("time-and-object", f'["{_TIME}", {{"id": "{_ID}"}}]'),
            ("time-and-null", f'["{_TIME}", null]'),
            ("time-and-bool", f'["{_TIME}", true]'),
            ("time-and-float", f'["{_TIME}", 1.5]'),
            ("int-and-id", f'[1700000000, "{_ID}"]'),
            ("numeric-string-time", f'["1700000000", "{_ID}"]'),
            ("null-and-id", f'[null, "{_ID}"]'),
            ("swapped", f'["{_ID}", "{_TIME}"]'),
            ("three-items", f'["{_TIME}", "{_ID}", 1]'),
            ("empty-list", "[]"),
            ("object", f'{{"created_at": "{_TIME}", "id": "{_ID}"}}'),
            ("two-char-string", '"ab"'),
            ("number", "1"),
            ("null", "null"),
            ("huge-int", "[" + "9" * 120 + "]"),
            ("huge-int-id", f'["{_TIME}", {"9" * 100}]'),
            ("naive-time", f'["2030-01-01T00:00:00", "{_ID}"]'),
            ("date-only", f'["2030-01-01", "{_ID}"]'),
            ("year-0", f'["0000-01-01T00:00:00+00:00", "{_ID}"]'),
            ("year-10000", f'["10000-01-01T00:00:00+00:00", "{_ID}"]'),
            ("out-of-range-in-utc-low", f'["0001-01-01T00:00:00+16:00", "{_ID}"]'),
            ("out-of-range-in-utc-high", f'["9999-12-31T23:59:59-16:00", "{_ID}"]'),
            ("offset-24h", f'["2030-01-01T00:00:00+24:00", "{_ID}"]'),
            ("month-13", f'["2030-13-01T00:00:00+00:00", "{_ID}"]'),
            ("not-a-uuid", f'["{_TIME}", "x"]'),
            ("short-uuid", f'["{_TIME}", "{_ID[:-1]}"]'),
            ("nested", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"),
            ("deeply-nested", "[" * 5000 + "]" * 5000),
            ("not-utf8", b"\xff\xfe"),
            ("truncated-json", f'["{_TIME}", "{_ID}"'),
            ("nan", f'[NaN, "{_ID}"]'),
        ]
    ],
)
def test_bad_cursors(cursor: str) -> None:
    with pytest.raises(HTTPException) as caught:
        decode_cursor(cursor)
    assert caught.value.status_code == 422
    assert caught.value.detail == [
        {"loc": ["query", "cursor"], "msg": "invalid cursor: pass the next_cursor of a previous page unchanged",
         "type": "value_error"}
    ]  # fmt: skip


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_ISO_TIME = st.datetimes(timezones=st.none() | st.just(UTC)).map(datetime.isoformat)
_UUID = st.uuids().map(str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=60),  # anything at all
        st.binary(max_size=60).map(_b64),  # any bytes, base64-encoded
        _JSON.map(lambda v: _b64(json.dumps(v))),  # any JSON
        # Pairs and near-pairs where each item is right or junk, to get past the time to the id.
        st.lists(_ISO_TIME | _UUID | _JSON, min_size=1, max_size=3).map(lambda v: _b64(json.dumps(v))),
    )
)
def test_any_cursor_decodes_or_is_a_422(cursor: str) -> None:
    try:
        created_at, task_id = decode_cursor(cursor)
    except HTTPException as exc:
        assert exc.status_code == 422
    else:  # what decodes is a usable keyset position
        assert created_at.tzinfo is UTC and isinstance(task_id, uuid.UUID)


def test_request_hash_is_about_meaning() -> None:
    base = TaskCreate(name="demo_ok", payload={"a": 1, "b": [1, 2]})
    same = [
        TaskCreate(name="demo_ok", payload={"b": [1, 2], "a": 1}, priority=5, max_retries=3),
        TaskCreate(name="demo_ok", payload={"a": 1, "b": [1, 2]}, idempotency_key="anything"),
    ]
    assert all(t.request_hash() == base.request_hash() for t in same)
    different = [
        TaskCreate(name="demo_ok", payload={"a": 1, "b": [2, 1]}),
        TaskCreate(name="demo_ok", payload={"a": 1, "b": [1, 2]}, priority=6),
        TaskCreate(name="demo_fail", payload={"a": 1, "b": [1, 2]}),
        TaskCreate(name="demo_ok", payload={"a": 1, "b": [1, 2]}, timeout_sec=5),
    ]
    assert len({t.request_hash() for t in different} | {base.request_hash()}) == len(different) + 1
    utc = TaskCreate(name="demo_ok", run_at="2030-01-01T12:00:00Z")
    paris = TaskCreate(name="demo_ok", run_at="2030-01-01T13:00:00+01:00")
    assert utc.request_hash() == paris.request_hash()


def test_bearer_keys_are_compared_exactly() -> None:
    keys = ["key-one", "kéy-two"]
    assert bearer_ok("Bearer key-one", keys)
    assert bearer_ok("bearer   kéy-two ", keys)
    refused = (None, "", "Bearer", "Bearer ", "Bearer key-on", "Bearer key-one2", "Bearer KEY-ONE", "Token key-one")
    for header in refused:
        assert not bearer_ok(header, keys), header
    assert not bearer_ok("Bearer \udcff", keys)
    assert not bearer_ok("Bearer anything", [])


@pytest.mark.parametrize(
    "keys",
    ["kéy", "good,kéy", "key with space", "tab\tkey", "nul\x00key", "bell\x07", "nb\u00a0sp", "emoji-\U0001f511"],
)
def test_api_keys_that_could_never_match_are_refused_without_being_repeated(keys: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, api_keys=keys)  # type: ignore[call-arg]
    message = str(caught.value)
    assert "API_KEYS: key " in message and "printable ASCII" in message
    for key in keys.split(","):
        assert key.strip() not in message


def test_usable_api_keys_are_accepted() -> None:
    settings = Settings(_env_file=None, api_keys=" k1 , a-B_c.d~e+f/g=, !#$%&'*:;<>?@[]^`{|}, ")  # type: ignore[call-arg]
    assert settings.api_key_list == ["k1", "a-B_c.d~e+f/g=", "!#$%&'*:;<>?@[]^`{|}"]


def test_refusals_are_logged_once_per_interval_per_client(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="taskscheduler.auth")
    now = [1000.0]
    refusals = RefusalLog(60.0, max_clients=2, clock=lambda: now[0])
    for _ in range(5):
        refusals.refused("10.0.0.1", "invalid API key", "GET /tasks")
    refusals.refused("10.0.0.2", "missing API key", "GET /dlq")
    now[0] += 59.9
    refusals.refused("10.0.0.1", "invalid API key", "GET /tasks")
    now[0] += 0.1
    refusals.refused("10.0.0.1", "invalid API key", "GET /tasks\nforged line")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "authentication failed for 10.0.0.1: invalid API key",
        "authentication failed for 10.0.0.2: missing API key",
        "authentication failed for 10.0.0.1: invalid API key (5 more refused since its last line)",
    ]
    assert caplog.records[-1].where == "GET /tasks?forged line"  # type: ignore[attr-defined]
    # Memory is bounded: a third address evicts the least recently logged one, whose count is lost.
    refusals.refused("10.0.0.3", "invalid API key", "GET /tasks")
    refusals.refused("10.0.0.2", "missing API key", "GET /dlq")
    assert len(caplog.records) == 5


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("example.com", False), ("", False)],
)  # fmt: skip
def test_open_beyond_loopback_without_keys_is_warned(
    caplog: pytest.LogCaptureFixture, host: str, loopback: bool
) -> None:
    assert is_loopback(host) is loopback
    assert warn_if_open("the API", host, 8000, []) is not loopback
    assert warn_if_open("the API", host, 8000, ["k"]) is False
    assert len(caplog.records) == (0 if loopback else 1)


def test_task_counts_report_every_pair() -> None:
    (family,) = TaskCountCollector(lambda: [("DEAD", "low", 3)]).collect()
    values = {(s.labels["status"], s.labels["queue"]): s.value for s in family.samples}
    assert len(values) == 7 * 3
    assert values[("DEAD", "low")] == 3 and values[("PENDING", "high")] == 0


def test_task_counts_left_out_when_the_database_fails() -> None:
    def broken() -> list[tuple[str, str, int]]:
        raise RuntimeError("away")

    assert list(TaskCountCollector(broken).collect()) == []
