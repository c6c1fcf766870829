"""The HTTP API against a real PostgreSQL and Redis: bad input is a clear 4xx, good input round-trips."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from fastapi.testclient import TestClient

from taskscheduler.api import body_guard, create_app
from taskscheduler.api.body_guard import MAX_JSON_DEPTH
from taskscheduler.config import Settings
from taskscheduler.store import db
from taskscheduler.store.db import Database
from taskscheduler.store.statement_pool import CONNECTION_WAIT_SEC, AsyncConn

T = TypeVar("T")

TASK_FIELDS = {
    "id",
    "name",
    "payload",
    "priority",
    "queue",
    "status",
    "run_at",
    "attempt",
    "max_retries",
    "last_error",
    "result",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def _rows(settings: Settings) -> tuple[int, int]:
    with db.transaction(settings.database_url) as conn:
        tasks = conn.exec_driver_sql("SELECT count(*) FROM tasks").scalar_one()
        events = conn.exec_driver_sql("SELECT count(*) FROM task_events").scalar_one()
    return int(tasks), int(events)


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _assert_clear_4xx(response: Any, expected: int) -> None:
    assert response.status_code == expected, (response.status_code, response.text)
    body = response.json()
    assert body.get("detail"), body
    if isinstance(body["detail"], list):
        assert all(item.get("msg") for item in body["detail"]), body


# --- rejected JSON bodies: (body, expected status) -------------------------------------------------

_OK = {"name": "demo_ok"}

REJECTED_JSON: list[Any] = [
    pytest.param({**_OK, "priority": 0}, id="priority-0"),
    pytest.param({**_OK, "priority": 11}, id="priority-11"),
    pytest.param({**_OK, "priority": "9"}, id="priority-string"),
    pytest.param({**_OK, "priority": 9.5}, id="priority-float"),
    pytest.param({**_OK, "priority": True}, id="priority-bool"),
    pytest.param({**_OK, "priority": None}, id="priority-null"),
    pytest.param({**_OK, "max_retries": -1}, id="max_retries-negative"),
    pytest.param({**_OK, "max_retries": "2"}, id="max_retries-string"),
    pytest.param({**_OK, "run_at": "not-a-date"}, id="run_at-garbage"),
    pytest.param({**_OK, "run_at": "2030-01-01T00:00:00"}, id="run_at-naive"),
    pytest.param({**_OK, "run_at": 1893456000}, id="run_at-epoch-number"),
    pytest.param({**_OK, "run_at": "1893456000"}, id="run_at-epoch-string"),
    pytest.param({**_OK, "payload": [1, 2]}, id="payload-list"),
    pytest.param({**_OK, "payload": "text"}, id="payload-string"),
    pytest.param({**_OK, "payload": None}, id="payload-null"),
    pytest.param({"payload": {}}, id="name-missing"),
    pytest.param({"name": "no_such_handler"}, id="name-unknown"),
    pytest.param({"name": ""}, id="name-empty"),
    pytest.param({**_OK, "colour": "blue"}, id="extra-field"),
    pytest.param({**_OK, "timeout_sec": 0}, id="timeout_sec-zero"),
    pytest.param({**_OK, "timeout_sec": -5}, id="timeout_sec-negative"),
    pytest.param({**_OK, "timeout_sec": "5"}, id="timeout_sec-string"),
    pytest.param({**_OK, "timeout_sec": True}, id="timeout_sec-bool"),
    pytest.param([_OK], id="body-list"),
]


@pytest.mark.parametrize("body", REJECTED_JSON)
def test_create_rejects_bad_json_body(client: TestClient, settings: Settings, body: Any) -> None:
    response = client.post("/tasks", json=body)
    _assert_clear_4xx(response, 422)
    assert _rows(settings) == (0, 0)


def test_create_rejects_run_at_an_hour_ago(client: TestClient, settings: Settings) -> None:
    response = client.post("/tasks", json={**_OK, "run_at": _iso(datetime.now(UTC) - timedelta(hours=1))})
    _assert_clear_4xx(response, 422)
    assert "past" in json.dumps(response.json()["detail"])
    assert _rows(settings) == (0, 0)


def test_unknown_name_lists_the_registered_ones(client: TestClient) -> None:
    response = client.post("/tasks", json={"name": "no_such_handler"})
    _assert_clear_4xx(response, 422)
    assert "demo_ok" in json.dumps(response.json()["detail"])


# --- rejected raw bodies: (bytes, content type, expected status) ------------------------------------

JSON = "application/json"

REJECTED_RAW: list[Any] = [
    pytest.param(b'{"name": "demo_ok",', JSON, 422, id="malformed-json"),
    pytest.param(b"", JSON, 422, id="empty-body"),
    pytest.param(b'{"name": "demo_ok"}', "text/plain", 415, id="text-plain"),
    pytest.param(b'{"name":"demo_ok","payload":{"x":NaN}}', JSON, 422, id="payload-NaN"),
    pytest.param(b'{"name":"demo_ok","payload":{"x":Infinity}}', JSON, 422, id="payload-Infinity"),
    pytest.param(b'{"name":"demo_ok","payload":{"x":-Infinity}}', JSON, 422, id="payload-minus-Infinity"),
    pytest.param(b'{"name":"demo_ok","timeout_sec":NaN}', JSON, 422, id="timeout_sec-NaN"),
    # Python reads 1e400 as float('inf'), which jsonb refuses.
    pytest.param(b'{"name":"demo_ok","payload":{"x":1e400}}', JSON, 422, id="payload-overflowing-float"),
    # jsonb refuses the NUL character, and UTF-8 cannot encode a lone surrogate.
    pytest.param(b'{"name":"demo_ok","payload":{"x":"a\\u0000b"}}', JSON, 422, id="payload-NUL-in-string"),
    pytest.param(b'{"name":"demo_ok","payload":{"a\\u0000":1}}', JSON, 422, id="payload-NUL-in-key"),
    pytest.param(b'{"name":"demo_ok","payload":{"x":"\\ud800"}}', JSON, 422, id="payload-lone-surrogate"),
    pytest.param(b'{"name":"demo_ok","payload":{"x":"\xed\xa0\x80"}}', JSON, 422, id="payload-raw-surrogate-bytes"),
    pytest.param(b'{"name":"demo_ok","priority":1e400}', JSON, 422, id="priority-overflowing-float"),
    pytest.param(b'{"name":"demo_ok","timeout_sec":1e400}', JSON, 422, id="timeout_sec-overflowing-float"),
    pytest.param(b'{"name":"demo_ok","run_at":1e400}', JSON, 422, id="run_at-overflowing-float"),
    pytest.param(b'{"name":"demo_ok","max_retries":1' + b"0" * 5000 + b"}", JSON, 422, id="max_retries-5001-digits"),
    # Unknown names and fields are echoed in the error response, which must still encode.
    pytest.param(b'{"name":"\\ud800"}', JSON, 422, id="name-lone-surrogate"),
    pytest.param(b'{"name":"demo_\\u0000"}', JSON, 422, id="name-NUL"),
    pytest.param(b'{"name":"demo_ok","run_at":"\\ud800"}', JSON, 422, id="run_at-lone-surrogate"),
    pytest.param(b'{"name":"demo_ok","colour":"\\ud800"}', JSON, 422, id="extra-field-lone-surrogate"),
    pytest.param(b'{"name":"demo_ok","payload":' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 422, id="too-deep"),
    pytest.param(b"\xff\xfe{}", JSON, 422, id="not-utf8"),
]


@pytest.mark.parametrize(("raw", "content_type", "expected"), REJECTED_RAW)
def test_create_rejects_bad_raw_body(
    client: TestClient, settings: Settings, raw: bytes, content_type: str, expected: int
) -> None:
    response = client.post("/tasks", content=raw, headers={"Content-Type": content_type})
    _assert_clear_4xx(response, expected)
    assert _rows(settings) == (0, 0)


@pytest.mark.parametrize(("raw", "content_type", "expected"), REJECTED_RAW)
def test_the_guards_byte_level_check_passes_no_rejected_body(raw: bytes, content_type: str, expected: int) -> None:
    # The guard skips parsing bodies its byte-level check passes; each must be one the full check
    # accepts, or one FastAPI's parser refuses as malformed.
    if expected != 422 or not body_guard._plainly_strict(raw):
        return
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH])
def test_the_guards_byte_level_check_counts_nesting_exactly(levels: int) -> None:
    # _nested_payload(n) nests n + 1 objects: the last level allowed, then one too many.
    assert body_guard._plainly_strict(_nested_payload(levels)) == (levels + 1 <= MAX_JSON_DEPTH)


def _oversized_payload(settings: Settings) -> dict[str, Any]:
    return {**_OK, "payload": {"blob": "x" * (settings.max_body_bytes + 1)}}


def test_create_rejects_oversized_body_by_content_length(client: TestClient, settings: Settings) -> None:
    raw = json.dumps(_oversized_payload(settings)).encode()
    response = client.post("/tasks", content=raw, headers={"Content-Type": JSON, "Content-Length": str(len(raw))})
    _assert_clear_4xx(response, 413)
    assert _rows(settings) == (0, 0)


def test_create_rejects_oversized_json_body(client: TestClient, settings: Settings) -> None:
    response = client.post("/tasks", json=_oversized_payload(settings))
    _assert_clear_4xx(response, 413)
    assert _rows(settings) == (0, 0)


def test_create_rejects_oversized_chunked_body(client: TestClient, settings: Settings) -> None:
    raw = json.dumps(_oversized_payload(settings)).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(raw), 16 * 1024):
            yield raw[start : start + 16 * 1024]

    response = client.post("/tasks", content=chunks(), headers={"Content-Type": JSON})
    _assert_clear_4xx(response, 413)
    assert _rows(settings) == (0, 0)


def test_body_just_under_the_limit_is_accepted(client: TestClient, settings: Settings) -> None:
    overhead = len(json.dumps({**_OK, "payload": {"blob": ""}}).encode())
    body = {**_OK, "payload": {"blob": "x" * (settings.max_body_bytes - overhead)}}
    assert len(json.dumps(body).encode()) == settings.max_body_bytes
    response = client.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    assert _rows(settings) == (1, 1)


def _nested_payload(levels: int) -> bytes:
    return b'{"name":"demo_ok","payload":' + b'{"a":' * levels + b"1" + b"}" * levels + b"}"


def test_payload_nested_to_the_limit_is_accepted(client: TestClient, settings: Settings) -> None:
    # The body is level 1 and the payload's outer object level 2: the innermost is at MAX_JSON_DEPTH.
    response = client.post("/tasks", content=_nested_payload(MAX_JSON_DEPTH - 1), headers={"Content-Type": JSON})
    assert response.status_code == 201, response.text
    assert client.get(f"/tasks/{response.json()['id']}").status_code == 200
    assert _rows(settings) == (1, 1)


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH, 300, 900], ids=lambda n: f"{n}-levels")
def test_payload_nested_too_deep_is_rejected(client: TestClient, settings: Settings, levels: int) -> None:
    # 300 levels was stored, then failed to serialise: a 500, and a task that could never be read.
    response = client.post("/tasks", content=_nested_payload(levels), headers={"Content-Type": JSON})
    _assert_clear_4xx(response, 422)
    assert _rows(settings) == (0, 0)


def test_large_integers_and_unicode_in_payload_round_trip(client: TestClient) -> None:
    payload = {"big": -(10**4299), "small": 1e-300, "text": "h\u00e9llo \U0001f600 \u4e2d", "\u00e9": [None]}
    response = client.post("/tasks", json={"name": "demo_ok", "payload": payload})
    assert response.status_code == 201, response.text
    assert client.get(f"/tasks/{response.json()['id']}").json()["payload"] == payload


# --- reads of unknown things ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/tasks/not-a-uuid", 422, id="task-not-a-uuid"),
        pytest.param(f"/tasks/{uuid.uuid4()}", 404, id="task-unknown"),
        pytest.param("/tasks/not-a-uuid/events", 422, id="events-not-a-uuid"),
        pytest.param(f"/tasks/{uuid.uuid4()}/events", 404, id="events-unknown"),
        pytest.param("/dlq?limit=0", 422, id="dlq-limit-0"),
        pytest.param("/dlq?limit=501", 422, id="dlq-limit-501"),
        pytest.param("/dlq?limit=ten", 422, id="dlq-limit-not-int"),
    ],
)
def test_get_rejects(client: TestClient, path: str, expected: int) -> None:
    _assert_clear_4xx(client.get(path), expected)


@pytest.mark.parametrize(
    "path", ["/tasks/", "/dlq/", "/metrics/", "/tasks/7d4a1b3c-0e5f-4a6b-8c9d-0e1f2a3b4c5d/events/"]
)
@pytest.mark.parametrize("api_keys", ["", "key-one"])
def test_a_trailing_slash_is_a_404_not_a_redirect_built_from_host(settings: Settings, path: str, api_keys: str) -> None:
    # Starlette's slash redirect took its Location from the Host header, which the client chooses.
    app = create_app(settings.model_copy(update={"api_keys": api_keys}))
    with TestClient(app, raise_server_exceptions=False, base_url="http://evil.example") as client:
        response = client.get(path, headers={"Authorization": "Bearer key-one"}, follow_redirects=False)
    assert response.status_code == 404, (response.status_code, response.headers)
    assert "location" not in response.headers
    assert response.json()["detail"]


# --- accepted input ---------------------------------------------------------------------------------


def test_create_with_defaults(client: TestClient, settings: Settings) -> None:
    before = datetime.now(UTC)
    response = client.post("/tasks", json={"name": "demo_ok"})
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["name"] == "demo_ok"
    assert task["payload"] == {}
    assert task["priority"] == 5
    assert task["queue"] == "default"
    assert task["status"] == "PENDING"
    assert task["attempt"] == 0
    assert task["max_retries"] == 3
    assert task["timeout_sec"] is None
    assert task["last_error"] is None
    assert task["result"] is None
    assert task["started_at"] is None
    assert task["finished_at"] is None
    run_at = _parse(task["run_at"])
    assert run_at.utcoffset() is not None
    assert abs((run_at - before).total_seconds()) < 5
    assert _rows(settings) == (1, 1)


@pytest.mark.parametrize(
    ("priority", "queue"),
    [
        pytest.param(10, "high", id="10-high"),
        pytest.param(9, "high", id="9-high"),
        pytest.param(8, "high", id="8-high"),
        pytest.param(7, "default", id="7-default"),
        pytest.param(4, "default", id="4-default"),
        pytest.param(3, "low", id="3-low"),
        pytest.param(2, "low", id="2-low"),
        pytest.param(1, "low", id="1-low"),
    ],
)
def test_priority_picks_the_queue(client: TestClient, priority: int, queue: str) -> None:
    response = client.post("/tasks", json={"name": "demo_ok", "priority": priority})
    assert response.status_code == 201, response.text
    assert response.json()["priority"] == priority
    assert response.json()["queue"] == queue


def test_create_with_every_field(client: TestClient) -> None:
    body = {
        "name": "demo_fail",
        "payload": {"fail": False, "nested": {"list": [1, 2.5, "three", None, True]}},
        "priority": 7,
        "run_at": "2030-01-01T12:00:00Z",
        "max_retries": 0,
        "timeout_sec": 2.5,
    }
    response = client.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["payload"] == body["payload"]
    assert task["max_retries"] == 0
    assert task["timeout_sec"] == 2.5
    assert _parse(task["run_at"]) == datetime(2030, 1, 1, 12, tzinfo=UTC)


def test_run_at_with_offset_round_trips_as_the_same_instant(client: TestClient) -> None:
    response = client.post("/tasks", json={"name": "demo_ok", "run_at": "2030-06-01T14:00:00+02:00"})
    assert response.status_code == 201, response.text
    created = _parse(response.json()["run_at"])
    assert created == datetime(2030, 6, 1, 12, tzinfo=UTC)
    fetched = client.get(f"/tasks/{response.json()['id']}").json()
    assert _parse(fetched["run_at"]) == created


@pytest.mark.parametrize("offset", ["+16:00", "-23:59"])
def test_offsets_python_reads_but_postgresql_would_refuse_are_stored_as_utc(client: TestClient, offset: str) -> None:
    # timestamptz takes offsets up to ±15:59 only; found by the fuzz test as a 500.
    response = client.post("/tasks", json={"name": "demo_ok", "run_at": f"2030-06-01T14:00:00{offset}"})
    assert response.status_code == 201, response.text
    expected = datetime.fromisoformat(f"2030-06-01T14:00:00{offset}").astimezone(UTC)
    assert _parse(response.json()["run_at"]) == expected
    listed = client.get("/tasks", params={"created_after": f"2000-01-01T00:00:00{offset}"})
    assert listed.status_code == 200, listed.text
    assert response.json()["id"] in [t["id"] for t in listed.json()["tasks"]]


def test_a_moment_out_of_range_once_in_utc_is_a_422(client: TestClient) -> None:
    response = client.post("/tasks", json={"name": "demo_ok", "run_at": "9999-12-31T23:00:00-16:00"})
    _assert_clear_4xx(response, 422)
    listed = client.get("/tasks", params={"created_before": "0001-01-01T00:00:00+16:00"})
    _assert_clear_4xx(listed, 422)


def test_run_at_slightly_in_the_past_is_accepted(client: TestClient, settings: Settings) -> None:
    run_at = datetime.now(UTC) - timedelta(seconds=10)
    response = client.post("/tasks", json={"name": "demo_ok", "run_at": _iso(run_at)})
    assert response.status_code == 201, response.text
    assert abs((_parse(response.json()["run_at"]) - run_at).total_seconds()) < 0.001
    assert _rows(settings) == (1, 1)


def test_get_returns_every_field(client: TestClient) -> None:
    created = client.post("/tasks", json={"name": "demo_ok", "payload": {"msg": "hi"}, "priority": 9}).json()
    response = client.get(f"/tasks/{created['id']}")
    assert response.status_code == 200, response.text
    task = response.json()
    assert set(task) >= TASK_FIELDS, TASK_FIELDS - set(task)
    assert task == created
    assert uuid.UUID(task["id"])
    assert task["payload"] == {"msg": "hi"}
    assert task["queue"] == "high"


def test_events_of_a_new_task(client: TestClient) -> None:
    created = client.post("/tasks", json={"name": "demo_ok"}).json()
    response = client.get(f"/tasks/{created['id']}/events")
    assert response.status_code == 200, response.text
    events = response.json()
    assert len(events) == 1
    event = events[0]
    assert set(event) == {"at", "from_status", "to_status", "attempt", "detail"}
    assert event["from_status"] is None
    assert event["to_status"] == "PENDING"
    assert event["attempt"] == 0
    assert event["detail"] == "created"
    assert _parse(event["at"]).utcoffset() is not None


def test_dlq_is_empty(client: TestClient) -> None:
    response = client.get("/dlq")
    assert response.status_code == 200, response.text
    assert response.json() == []
    assert client.get("/dlq?limit=500").json() == []
    assert client.get("/dlq?limit=1").json() == []


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_docs_and_openapi(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    openapi = client.get("/openapi.json")
    assert openapi.status_code == 200
    paths = openapi.json()["paths"]
    assert "/tasks" in paths
    assert "post" in paths["/tasks"]
    assert "/tasks/{task_id}" in paths


# --- the app uses the settings it was built with ----------------------------------------------------


def test_app_uses_its_own_grace(settings: Settings) -> None:
    strict = settings.model_copy(update={"run_at_grace_sec": 0.0})
    with TestClient(create_app(strict)) as strict_client:
        run_at = datetime.now(UTC) - timedelta(seconds=10)
        response = strict_client.post("/tasks", json={"name": "demo_ok", "run_at": _iso(run_at)})
    _assert_clear_4xx(response, 422)
    assert _rows(settings) == (0, 0)


def test_app_uses_its_own_body_limit(settings: Settings) -> None:
    small = settings.model_copy(update={"max_body_bytes": 2048})
    with TestClient(create_app(small)) as small_client:
        response = small_client.post("/tasks", json={"name": "demo_ok", "payload": {"blob": "x" * 3000}})
    _assert_clear_4xx(response, 413)
    assert _rows(settings) == (0, 0)


def test_readyz_reports_an_unreachable_broker(settings: Settings) -> None:
    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as broken_client:
        response = broken_client.get("/readyz")
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["database"] == "ok"
    assert body["broker"].startswith("unreachable")


# --- POST /tasks on the event loop's own connections ------------------------------------------------


def _terminate_api_connections(settings: Settings) -> int:
    with db.transaction(settings.database_url) as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND application_name = 'taskscheduler'"
            ).scalar_one()
        )


def test_create_survives_pooled_connections_that_died(client: TestClient, settings: Settings) -> None:
    for _ in range(3):  # connections in the pool, idle
        assert client.post("/tasks", json=_OK).status_code == 201
    assert _terminate_api_connections(settings) >= 1
    response = client.post("/tasks", json=_OK)
    assert response.status_code == 201, response.text
    assert _rows(settings) == (4, 4)


def test_create_sent_twice_with_one_id_makes_one_task(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a repeat after a dead connection meets when the first statement did commit.
    fixed = uuid.uuid4()
    monkeypatch.setattr(uuid, "uuid4", lambda: fixed)
    first = client.post("/tasks", json=_OK)
    second = client.post("/tasks", json=_OK)
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    assert first.json()["id"] == second.json()["id"] == str(fixed)
    assert _rows(settings) == (1, 1)


@pytest.mark.parametrize("lifespan", [True, False], ids=["pool", "no-lifespan"])
def test_create_is_a_503_when_the_database_is_unreachable(settings: Settings, lifespan: bool) -> None:
    down = settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/none"})
    app = create_app(down, process_heartbeat=False)
    started = time.monotonic()
    if lifespan:
        # The lifespan opens the pool without waiting for the database.
        with TestClient(app, raise_server_exceptions=False) as down_client:
            response = down_client.post("/tasks", json=_OK)
    else:
        response = TestClient(app, raise_server_exceptions=False).post("/tasks", json=_OK)
    assert response.status_code == 503, response.text
    assert response.json()["detail"] == "database unavailable, try again"
    assert time.monotonic() - started < CONNECTION_WAIT_SEC + 2


def test_batch_and_keyed_create_survive_pooled_connections_that_died(client: TestClient, settings: Settings) -> None:
    for _ in range(3):
        assert client.post("/tasks", json=_OK).status_code == 201
    assert _terminate_api_connections(settings) >= 1
    response = client.post("/tasks/batch", json={"tasks": [_OK, _OK]})
    assert response.status_code == 201, response.text
    assert _terminate_api_connections(settings) >= 1
    response = client.post("/tasks", json=_OK, headers={"Idempotency-Key": "after-a-restart"})
    assert response.status_code == 201, response.text
    assert _rows(settings) == (6, 6)


async def _in_pool(settings: Settings, use: Callable[[Database], Awaitable[T]]) -> T:
    database = Database(settings.database_url)
    await database.open_statement_pool(wait=True)
    try:
        return await use(database)
    finally:
        await database.close_statement_pool()


async def _kill_own_backend(conn: AsyncConn) -> None:
    with contextlib.suppress(psycopg.OperationalError):
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")


def test_a_transaction_whose_connection_died_before_commit_runs_once_more(settings: Settings) -> None:
    calls: list[int] = []

    async def work(conn: AsyncConn) -> int:
        calls.append(1)
        if len(calls) == 1:
            await _kill_own_backend(conn)
        row = await (await conn.execute("SELECT 7 AS n")).fetchone()
        assert row is not None
        return int(row["n"])

    assert asyncio.run(_in_pool(settings, lambda database: database.run_transaction_async(work))) == 7
    assert len(calls) == 2


def test_a_connection_dead_twice_is_an_error_not_a_third_try(settings: Settings) -> None:
    calls: list[int] = []

    async def work(conn: AsyncConn) -> None:
        calls.append(1)
        await _kill_own_backend(conn)
        await conn.execute("SELECT 1")

    with pytest.raises(psycopg.OperationalError):
        asyncio.run(_in_pool(settings, lambda database: database.run_statement_async(work)))
    assert len(calls) == 2


def test_a_transaction_whose_commit_failed_is_not_retried(settings: Settings) -> None:
    # The COMMIT may have been carried out before the connection died: running the work again could
    # do it twice.
    calls: list[int] = []

    async def work(conn: AsyncConn) -> None:
        calls.append(1)
        pid = conn.info.backend_pid
        with db.transaction(settings.database_url) as other:
            # With a timeout, it returns once the backend has exited: the COMMIT meets a dead connection.
            other.exec_driver_sql(f"SELECT pg_terminate_backend({pid}, 5000)")

    with pytest.raises(psycopg.OperationalError):
        asyncio.run(_in_pool(settings, lambda database: database.run_transaction_async(work)))
    assert len(calls) == 1


def test_the_pool_keeps_its_connections_under_concurrent_load(settings: Settings) -> None:
    # Closing connections above an idle size and reopening them under load cost a tenth of the
    # API's time: the pool has a fixed size, and more concurrent requests wait for a connection.
    async def statement(conn: AsyncConn) -> None:
        await conn.execute("SELECT pg_sleep(0.001)")

    async def load(database: Database) -> dict[str, int]:
        for _ in range(5):
            await asyncio.gather(*(database.run_statement_async(statement) for _ in range(40)))
        assert database.statement_pool is not None
        return database.statement_pool.get_stats()

    stats = asyncio.run(_in_pool(settings, load))
    assert stats["pool_max"] == stats["pool_min"] == 10
    assert stats["connections_num"] == 10, stats
