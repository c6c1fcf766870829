"""API keys on every route but the public ones, and the Prometheus metrics of the API, scheduler and workers."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from tests.helpers import backdate, dispatch_all, free_port, new_task, to_dead, to_started

from taskscheduler import broker, metrics, worker
from taskscheduler.api import create_app
from taskscheduler.config import Settings
from taskscheduler.lifecycle import DlqReason
from taskscheduler.scheduler import rescue
from taskscheduler.store import db, operations
from taskscheduler.store import dlq as dlq_store

KEYS = "key-one, key-two"
PUBLIC = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}


@pytest.fixture
def secured(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"api_keys": KEYS})), raise_server_exceptions=False) as c:
        yield c


def _requests(app: Any) -> list[tuple[str, str]]:
    """(method, concrete path) of every route of the app: those in the OpenAPI document, and the
    docs' own (FastAPI adds them outside the document)."""
    pairs = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    for route in app.routes:
        if hasattr(route, "path") and not isinstance(route, APIRoute):
            pairs |= {(method, route.path) for method in (getattr(route, "methods", None) or {"GET"}) - {"HEAD"}}
    return sorted((method, path.replace("{task_id}", str(uuid.uuid4()))) for method, path in pairs)


def test_every_route_but_the_public_ones_needs_a_key(secured: TestClient) -> None:
    requests = _requests(secured.app)
    assert {path for _, path in requests} >= PUBLIC | {"/tasks", "/tasks/batch", "/dlq", "/dlq/retry", "/metrics"}
    for method, path in requests:
        if path in PUBLIC:
            response = secured.request(method, path)
            assert response.status_code == 200, (method, path, response.status_code)
            continue
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "key-one"},
            {"Authorization": "Basic a2V5LW9uZQ=="},
        ):
            response = secured.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.status_code)
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
            assert response.json()["detail"]
        # With a key the request gets through (to whatever the route says about it).
        for key in ("key-one", "key-two"):
            response = secured.request(method, path, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code != 401, (method, path, response.text)


def test_401_without_a_key_and_200_with_one(secured: TestClient) -> None:
    assert secured.get("/tasks").status_code == 401
    assert secured.post("/tasks", json={"name": "demo_ok"}).status_code == 401
    headers = {"Authorization": "Bearer key-two"}
    created = secured.post("/tasks", json={"name": "demo_ok"}, headers=headers)
    assert created.status_code == 201, created.text
    assert secured.get(f"/tasks/{created.json()['id']}", headers=headers).status_code == 200
    assert secured.get("/tasks", headers={"authorization": "bearer key-one"}).status_code == 200  # case-insensitive
    assert secured.get("/metrics", headers=headers).status_code == 200
    assert secured.get("/metrics").status_code == 401


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(["Bearer key-one", "Bearer wrong"], id="good-then-bad"),
        pytest.param(["Bearer wrong", "Bearer key-one"], id="bad-then-good"),
        pytest.param(["Bearer key-one", "Bearer key-two"], id="two-good"),
        pytest.param(["Bearer key-one", ""], id="good-then-empty"),
    ],
)
def test_several_authorization_headers_are_a_400(secured: TestClient, values: list[str]) -> None:
    # Only the first used to be checked, while a proxy or a later layer may read another one.
    response = secured.get("/tasks", headers=[("Authorization", value) for value in values])
    assert response.status_code == 400, response.text
    assert response.json() == {"detail": "several Authorization headers: send exactly one"}
    created = secured.post("/tasks", json={"name": "demo_ok"}, headers=[("authorization", v) for v in values])
    assert created.status_code == 400
    assert secured.get("/tasks", headers={"Authorization": "Bearer key-one"}).status_code == 200


def test_refused_requests_are_logged_once_a_minute_per_client_without_the_key(
    secured: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="taskscheduler.auth")
    guesses = [f"Bearer guess-{n}-s3cr3t" for n in range(5)]
    for guess in guesses:
        assert secured.get("/tasks", headers={"Authorization": guess}).status_code == 401
    assert secured.get("/dlq").status_code == 401
    lines = [r for r in caplog.records if r.name == "taskscheduler.auth"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "authentication failed for testclient: invalid API key" in lines[0].getMessage()
    assert lines[0].where == "GET /tasks"  # type: ignore[attr-defined]
    assert "s3cr3t" not in caplog.text and "guess" not in caplog.text


def test_a_stranger_is_refused_before_the_body_is_read(secured: TestClient) -> None:
    for content in (b'{"name": ', b"x" * 500_000):
        response = secured.post("/tasks", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 401


def test_without_api_keys_everything_is_open(client: TestClient) -> None:
    assert client.get("/tasks").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_swagger_has_an_authorize_button(secured: TestClient) -> None:
    spec = secured.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    assert spec["paths"]["/tasks"]["post"]["security"] == [{"ApiKey": []}]
    assert spec["paths"]["/tasks/{task_id}/cancel"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert "401" in spec["paths"]["/tasks"]["get"]["responses"]
    assert "swagger" in secured.get("/docs").text.lower()


# --- metrics ------------------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _samples(response.text)


def test_current_counts_by_status_and_queue(client: TestClient) -> None:
    dead = new_task(priority=5)
    to_dead(dead)  # (dispatches every task due within a day: first)
    for priority in (9, 9, 5, 2):
        new_task(priority=priority)
    samples = _scrape(client)
    assert _value(samples, "taskscheduler_tasks_current", status="PENDING", queue="high") == 2
    assert _value(samples, "taskscheduler_tasks_current", status="PENDING", queue="default") == 1
    assert _value(samples, "taskscheduler_tasks_current", status="PENDING", queue="low") == 1
    assert _value(samples, "taskscheduler_tasks_current", status="DEAD", queue="default") == 1
    # Every pair is there, zeros included.
    assert ("taskscheduler_tasks_current", frozenset({("status", "SUCCEEDED"), ("queue", "low")})) in samples
    assert sum(v for (name, _), v in samples.items() if name == "taskscheduler_tasks_current") == 5


def test_counters_and_histograms_follow_what_happens(client: TestClient, settings: Settings) -> None:
    before = _scrape(client)
    created = client.post("/tasks", json={"name": "demo_ok", "priority": 9})
    assert created.status_code == 201
    task_id = uuid.UUID(created.json()["id"])
    (item,) = dispatch_all()
    assert worker.run_attempt(task_id, item.attempt) == "succeeded"
    failing = uuid.UUID(client.post("/tasks", json={"name": "demo_fail", "payload": {"fail": True}}).json()["id"])
    (item,) = dispatch_all()
    assert worker.run_attempt(failing, item.attempt) == "failed"
    assert client.post(f"/tasks/{failing}/cancel").status_code == 200
    after = _scrape(client)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("taskscheduler_tasks_created_total", queue="high") == 1
    assert delta("taskscheduler_tasks_created_total", queue="default") == 1
    assert delta("taskscheduler_task_transitions_total", from_status="PENDING", to_status="ENQUEUED", queue="high") == 1
    assert delta("taskscheduler_task_transitions_total", from_status="ENQUEUED", to_status="STARTED", queue="high") == 1
    assert (
        delta("taskscheduler_task_transitions_total", from_status="STARTED", to_status="SUCCEEDED", queue="high") == 1
    )
    transition = {"from_status": "STARTED", "to_status": "FAILED", "queue": "default"}
    assert delta("taskscheduler_task_transitions_total", **transition) == 1
    transition = {"from_status": "FAILED", "to_status": "CANCELLED", "queue": "default"}
    assert delta("taskscheduler_task_transitions_total", **transition) == 1
    assert delta("taskscheduler_dispatch_lag_seconds_count", queue="high") == 1
    assert delta("taskscheduler_run_time_seconds_count", queue="high", outcome="succeeded") == 1
    assert delta("taskscheduler_run_time_seconds_count", queue="default", outcome="failed") == 1


def test_rescue_and_dlq_counters(client: TestClient, settings: Settings) -> None:
    from taskscheduler.scheduler.publisher import CeleryPublisher

    broker.configure_celery(settings)
    before = _scrape(client)
    task_id = new_task(max_retries=0)
    attempt = to_started(task_id)
    backdate(task_id, heartbeat_at=timedelta(seconds=settings.heartbeat_timeout_sec + 1))
    backdate(task_id, started_at=timedelta(seconds=settings.stuck_after_sec + 1))
    assert rescue.run_once(database=db.database_for(), settings=settings, publisher=CeleryPublisher(settings)).dead == 1
    with db.transaction() as conn:
        assert dlq_store.record_dlq_event(
            conn, task_id=task_id, attempt=attempt, task_name="demo_ok", reason="stuck_task_timeout", error="stuck"
        )
        # A duplicate DLQ message adds no row and is not counted.
        assert not dlq_store.record_dlq_event(
            conn, task_id=task_id, attempt=attempt, task_name="demo_ok", reason="stuck_task_timeout", error="stuck"
        )
    after = _scrape(client)
    assert (
        _value(after, "taskscheduler_rescues_total", reason="no_heartbeat")
        - _value(before, "taskscheduler_rescues_total", reason="no_heartbeat")
        == 1
    )
    reason = DlqReason.STUCK_TASK_TIMEOUT.value
    assert (
        _value(after, "taskscheduler_dlq_events_total", reason=reason)
        - _value(before, "taskscheduler_dlq_events_total", reason=reason)
        == 1
    )
    transition = {"from_status": "STARTED", "to_status": "DEAD", "queue": "default"}
    assert (
        _value(after, "taskscheduler_task_transitions_total", **transition)
        - _value(before, "taskscheduler_task_transitions_total", **transition)
        == 1
    )


def test_metrics_scrape_survives_a_failing_count(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(conn: Any) -> list[tuple[str, str, int]]:
        raise RuntimeError("database away")

    monkeypatch.setattr(operations, "task_counts", broken)
    samples = _scrape(client)
    assert not [name for name, _ in samples if name == "taskscheduler_tasks_current"]
    assert [name for name, _ in samples if name.startswith("taskscheduler_tasks_created")]


def test_the_scheduler_and_worker_endpoint_asks_for_a_key_too(settings: Settings) -> None:
    port = free_port()
    server = metrics.serve("127.0.0.1", port, ["key-one"])
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        refused = httpx.get(url, timeout=5)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=5).status_code == 401
        served = httpx.get(url, headers={"Authorization": "Bearer key-one"}, timeout=5)
        assert served.status_code == 200
        assert "taskscheduler_task_transitions_total" in served.text or "taskscheduler_task_transitions" in served.text
    finally:
        server.shutdown()
        server.server_close()


def test_the_metrics_endpoint_refuses_several_authorization_headers(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    server = metrics.serve("127.0.0.1", port, ["key-one"])
    assert server is not None
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        for values in (["Bearer key-one", "Bearer wrong"], ["Bearer wrong", "Bearer key-one"]):
            response = httpx.get(url, headers=[("Authorization", v) for v in values], timeout=5)
            assert response.status_code == 400, response.text
        for n in range(3):
            assert httpx.get(url, headers={"Authorization": f"Bearer nope-{n}"}, timeout=5).status_code == 401
    finally:
        server.shutdown()
        server.server_close()
    lines = [r.getMessage() for r in caplog.records if r.name == "taskscheduler.auth"]
    assert lines == ["authentication failed for 127.0.0.1: several Authorization headers: send exactly one"]
    assert "nope" not in caplog.text


@pytest.mark.parametrize(("host", "keys", "warned"), [("0.0.0.0", [], True), ("0.0.0.0", ["k"], False)])
def test_the_metrics_endpoint_warns_when_open_beyond_loopback_without_keys(
    caplog: pytest.LogCaptureFixture, host: str, keys: list[str], warned: bool
) -> None:
    # The port is held (bound, never listening) so that serve() cannot bind it: nothing listens
    # beyond loopback during the test, and the warning is about the configuration anyway.
    with socket.socket() as held:
        held.bind((host, 0))
        assert metrics.serve(host, held.getsockname()[1], keys) is None
    assert ("API_KEYS is empty" in caplog.text) is warned
    assert "metrics not served" in caplog.text


def test_the_metrics_endpoint_on_loopback_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="taskscheduler")
    server = metrics.serve("127.0.0.1", free_port(), [])
    assert server is not None
    server.shutdown()
    server.server_close()
    assert "metrics on http://127.0.0.1:" in caplog.text
    assert "API_KEYS is empty" not in caplog.text


def test_a_taken_metrics_port_is_an_error_in_the_log_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert metrics.serve("127.0.0.1", taken.getsockname()[1], []) is None
    assert "metrics not served" in caplog.text


def test_a_batch_refused_for_a_conflicting_key_counts_no_creation(client: TestClient) -> None:
    assert client.post("/tasks", json={"name": "demo_ok", "idempotency_key": "taken"}).status_code == 201
    before = _scrape(client)
    tasks = [{"name": "demo_ok", "priority": 9}, {"name": "demo_fail", "idempotency_key": "taken"}]
    assert client.post("/tasks/batch", json={"tasks": tasks}).status_code == 409
    after = _scrape(client)
    name = "taskscheduler_tasks_created_total"
    assert _value(after, name, queue="high") == _value(before, name, queue="high")
