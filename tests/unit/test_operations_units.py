"""Pure pieces of the operations features: durations, API errors for people, cursors, request hashes, keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import HTTPException

from taskscheduler.api.routes import decode_cursor, encode_cursor
from taskscheduler.api.schemas import TaskCreate
from taskscheduler.auth import bearer_ok
from taskscheduler.client import ClientError, describe_error, parse_duration
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
    import uuid

    moment = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    task_id = uuid.uuid4()
    cursor = encode_cursor(moment, task_id)
    assert "=" not in cursor
    assert decode_cursor(cursor) == (moment, task_id)


@pytest.mark.parametrize("cursor", ["", "%%%", "bm90IGpzb24", "WzEsIDJd", "WyIyMDMwLTAxLTAxVDAwOjAwOjAwIiwgIngiXQ"])
def test_bad_cursors(cursor: str) -> None:
    with pytest.raises(HTTPException) as caught:
        decode_cursor(cursor)
    assert caught.value.status_code == 422


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


def test_task_counts_report_every_pair() -> None:
    (family,) = TaskCountCollector(lambda: [("DEAD", "low", 3)]).collect()
    values = {(s.labels["status"], s.labels["queue"]): s.value for s in family.samples}
    assert len(values) == 7 * 3
    assert values[("DEAD", "low")] == 3 and values[("PENDING", "high")] == 0


def test_task_counts_left_out_when_the_database_fails() -> None:
    def broken() -> list[tuple[str, str, int]]:
        raise RuntimeError("away")

    assert list(TaskCountCollector(broken).collect()) == []
