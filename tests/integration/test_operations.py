"""Operating the scheduler through the API: list, cancel, retry, the DLQ replay, idempotency keys, batches."""

from __future__ import annotations

import base64
import random
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from tests.helpers import dispatch_all, events, new_task, queued, task_row, to_dead, to_started

from taskscheduler import handlers, worker
from taskscheduler.api import create_app
from taskscheduler.lifecycle import DlqReason
from taskscheduler.store import creation, db, operations, sweeps, transitions

# --- helpers ------------------------------------------------------------------------------------------------------


def _count(sql: str, **params: Any) -> int:
    with db.transaction() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def _create(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/tasks", json={"name": "demo_ok", **body})
    assert response.status_code == 201, response.text
    return dict(response.json())


def _ids(page: dict[str, Any]) -> list[str]:
    return [t["id"] for t in page["tasks"]]


def _all_pages(client: TestClient, params: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        response = client.get("/tasks", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        page = response.json()
        seen += _ids(page)
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


def _fail_now(task_id: uuid.UUID) -> None:
    """STARTED -> FAILED, due in an hour."""
    attempt = to_started(task_id)
    with db.transaction() as conn:
        assert transitions.fail(conn, task_id=task_id, attempt=attempt, error="boom", retry_in_sec=3600)


def _succeed(task_id: uuid.UUID) -> None:
    attempt = to_started(task_id)
    with db.transaction() as conn:
        assert transitions.succeed(conn, task_id=task_id, attempt=attempt, result=None)


def _record_dlq_messages(redis_client: Any, prefix: str) -> int:
    """Do what the DLQ worker does with every message waiting in the dlq queue; returns how many."""
    messages = queued(redis_client, prefix, "dlq")
    redis_client.delete(f"{prefix}dlq")
    for args in messages:
        worker.record_dead(*args)
    return len(messages)


# --- GET /tasks ---------------------------------------------------------------------------------------------------


def test_list_is_newest_first_without_payload_and_result(client: TestClient) -> None:
    created = [_create(client, payload={"n": n})["id"] for n in range(5)]
    response = client.get("/tasks")
    assert response.status_code == 200, response.text
    page = response.json()
    assert _ids(page) == created[::-1]
    assert page["next_cursor"] is None
    assert "payload" not in page["tasks"][0] and "result" not in page["tasks"][0]
    assert page["tasks"][0]["status"] == "PENDING" and page["tasks"][0]["queue"] == "default"


def test_list_filters(client: TestClient) -> None:
    dead = new_task(name="demo_fail")
    to_dead(dead)  # (dispatches every due task: first)
    ok_high = _create(client, priority=9)["id"]
    fail_low = _create(client, name="demo_fail", priority=2)["id"]
    cancelled = _create(client)["id"]
    assert client.post(f"/tasks/{cancelled}/cancel").status_code == 200

    def ids(**params: Any) -> set[str]:
        response = client.get("/tasks", params=params)
        assert response.status_code == 200, response.text
        return set(_ids(response.json()))

    assert ids(status="DEAD") == {str(dead)}
    assert ids(status=["DEAD", "CANCELLED"]) == {str(dead), cancelled}
    assert ids(status="PENDING") == {ok_high, fail_low}
    assert ids(name="demo_fail") == {fail_low, str(dead)}
    assert ids(queue="high") == {ok_high}
    assert ids(queue="low", name="demo_fail") == {fail_low}
    assert ids(status="SUCCEEDED") == set()

    with db.transaction() as conn:
        conn.execute(text("UPDATE tasks SET created_at = created_at - interval '1 hour' WHERE id = :id"), {"id": dead})
    boundary = datetime.now(UTC) - timedelta(minutes=30)
    assert ids(created_before=boundary.isoformat()) == {str(dead)}
    assert ids(created_after=boundary.isoformat()) == {ok_high, fail_low, cancelled}
    exact = task_row(dead)["created_at"].isoformat()
    assert str(dead) in ids(created_after=exact), "created_after is inclusive"
    assert str(dead) not in ids(created_before=exact), "created_before is exclusive"


def test_list_limit_and_cursor(client: TestClient) -> None:
    created = [_create(client)["id"] for _ in range(7)][::-1]
    first = client.get("/tasks", params={"limit": 3}).json()
    assert _ids(first) == created[:3] and first["next_cursor"]
    second = client.get("/tasks", params={"limit": 3, "cursor": first["next_cursor"]}).json()
    assert _ids(second) == created[3:6]
    third = client.get("/tasks", params={"limit": 3, "cursor": second["next_cursor"]}).json()
    assert _ids(third) == created[6:] and third["next_cursor"] is None
    exact = client.get("/tasks", params={"limit": 7}).json()
    assert len(exact["tasks"]) == 7 and exact["next_cursor"] is None


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"status": "BURIED"}, id="unknown-status"),
        pytest.param({"status": ["DEAD", "dead"]}, id="lowercase-status"),
        pytest.param({"queue": "dlq"}, id="queue-dlq"),
        pytest.param({"queue": "urgent"}, id="unknown-queue"),
        pytest.param({"limit": 0}, id="limit-0"),
        pytest.param({"limit": 501}, id="limit-501"),
        pytest.param({"limit": "ten"}, id="limit-not-int"),
        pytest.param({"created_after": "yesterday"}, id="created_after-garbage"),
        pytest.param({"created_before": "2030-01-01T00:00:00"}, id="created_before-naive"),
        pytest.param({"cursor": "not a cursor"}, id="cursor-garbage"),
        pytest.param({"cursor": base64.urlsafe_b64encode(b"[1, 2]").decode()}, id="cursor-wrong-types"),
        pytest.param({"cursor": base64.urlsafe_b64encode(b'["2030-01-01T00:00:00", "x"]').decode()}, id="cursor-bad"),
        pytest.param({"cursor": base64.urlsafe_b64encode(b"\xff\xfe").decode()}, id="cursor-not-utf8"),
        pytest.param(
            {"cursor": base64.urlsafe_b64encode(b'["2024-01-01T00:00:00+00:00", 5]').decode()}, id="cursor-int-id"
        ),
        pytest.param({"cursor": base64.urlsafe_b64encode(b"[1]").decode()}, id="cursor-one-item"),
        pytest.param({"name": ""}, id="name-empty"),
        pytest.param({"name": "demo\x00ok"}, id="name-NUL"),
        pytest.param({"cursor": "\x00"}, id="cursor-NUL"),
        pytest.param(
            {"cursor": base64.urlsafe_b64encode(f'["0001-01-01T00:00:00+16:00", "{uuid.uuid4()}"]'.encode()).decode()},
            id="cursor-out-of-range-in-utc",
        ),
    ],
)
def test_list_rejects(client: TestClient, params: dict[str, Any]) -> None:
    response = client.get("/tasks", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_pagination_sees_every_task_exactly_once_while_tasks_are_created(client: TestClient) -> None:
    # Some created one by one, 60 in one statement (one created_at: the id breaks the tie).
    before = {str(new_task()) for _ in range(90)}
    with db.transaction() as conn:
        spec = creation.NewTask(
            name="demo_ok", payload={}, priority=5, queue="default", run_at=None, max_retries=3, timeout_sec=None
        )
        before |= {str(r.row["id"]) for r in creation.create_tasks(conn, [spec] * 60)}
    stop = threading.Event()
    created_meanwhile: list[uuid.UUID] = []

    def create_more() -> None:
        while not stop.is_set():
            created_meanwhile.append(new_task())

    creator = threading.Thread(target=create_more)
    creator.start()
    try:
        seen = _all_pages(client, {"limit": 7})
    finally:
        stop.set()
        creator.join()
    assert len(created_meanwhile) > 0
    assert len(seen) == len(set(seen)), "a task appeared on two pages"
    assert before <= set(seen), f"{len(before - set(seen))} tasks were skipped"
    # And with a filter, paging through exactly the matching tasks.
    assert sorted(_all_pages(client, {"limit": 11, "status": "PENDING", "name": "demo_ok"})) == sorted(
        str(t) for t in [*before, *created_meanwhile]
    )


# --- cancel -------------------------------------------------------------------------------------------------------


def test_cancel_pending(client: TestClient) -> None:
    task_id = _create(client, run_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())["id"]
    response = client.post(f"/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["status"] == "CANCELLED" and task["finished_at"] is not None
    assert events(uuid.UUID(task_id))[-1] == ("PENDING", "CANCELLED", 0)
    assert dispatch_all() == []  # never dispatched


def test_cancel_failed() -> None:
    task_id = new_task()
    _fail_now(task_id)
    with db.transaction() as conn:
        moved = operations.cancel(conn, task_id)
    assert moved.row is not None and moved.row["status"] == "CANCELLED"
    assert events(task_id)[-1] == ("FAILED", "CANCELLED", 1)


def test_cancel_enqueued_drops_the_message_already_sent(client: TestClient) -> None:
    task_id = new_task()
    (item,) = dispatch_all()
    response = client.post(f"/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text
    assert events(task_id)[-1] == ("ENQUEUED", "CANCELLED", 1)
    assert worker.run_attempt(task_id, item.attempt) == "dropped"
    assert task_row(task_id)["status"] == "CANCELLED"
    assert "STARTED" not in [e[1] for e in events(task_id)]


@pytest.mark.parametrize(
    ("prepare", "reason"),
    [
        pytest.param(to_started, "running (STARTED)", id="started"),
        pytest.param(_succeed, "already finished (SUCCEEDED)", id="succeeded"),
        pytest.param(to_dead, "already finished (DEAD)", id="dead"),
    ],
)
def test_cancel_refuses_started_and_finished_tasks(client: TestClient, prepare: Any, reason: str) -> None:
    task_id = new_task()
    prepare(task_id)
    before = task_row(task_id)
    response = client.post(f"/tasks/{task_id}/cancel")
    assert response.status_code == 409, response.text
    assert reason in response.json()["detail"]
    assert task_row(task_id) == before


def test_cancel_twice_is_a_conflict(client: TestClient) -> None:
    task_id = _create(client)["id"]
    assert client.post(f"/tasks/{task_id}/cancel").status_code == 200
    response = client.post(f"/tasks/{task_id}/cancel")
    assert response.status_code == 409 and "CANCELLED" in response.json()["detail"]
    assert [e[1] for e in events(uuid.UUID(task_id))].count("CANCELLED") == 1


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_cancel_and_retry_of_unknown_tasks(client: TestClient, action: str) -> None:
    assert client.post(f"/tasks/{uuid.uuid4()}/{action}").status_code == 404
    assert client.post(f"/tasks/not-a-uuid/{action}").status_code == 422


def test_cancel_racing_dispatch_either_cancels_or_runs_each_task(client: TestClient) -> None:
    """A canceller (through the API) and a scheduler plus worker (through the real code) race over
    the same tasks: each task ends either CANCELLED and never started, or SUCCEEDED, run once."""
    task_ids = [new_task() for _ in range(150)]
    order = task_ids[:]
    random.Random(5).shuffle(order)
    barrier = threading.Barrier(2)
    cancel_ok: dict[uuid.UUID, bool] = {}
    outcomes: dict[uuid.UUID, list[str]] = {}
    cancelling = threading.Event()
    cancelling.set()
    errors: list[BaseException] = []

    def canceller() -> None:
        try:
            barrier.wait()
            for task_id in order:
                response = client.post(f"/tasks/{task_id}/cancel")
                assert response.status_code in (200, 409), response.text
                cancel_ok[task_id] = response.status_code == 200
        except BaseException as exc:
            errors.append(exc)
        finally:
            cancelling.clear()

    def scheduler_and_worker() -> None:
        try:
            barrier.wait()
            while True:
                with db.transaction() as conn:
                    batch = sweeps.dispatch_due(conn, limit=5)
                if not batch and not cancelling.is_set():
                    with db.transaction() as conn:
                        batch = sweeps.dispatch_due(conn, limit=1000)
                    if not batch:
                        return
                for item in batch:
                    outcomes.setdefault(item.id, []).append(worker.run_attempt(item.id, item.attempt))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=canceller), threading.Thread(target=scheduler_and_worker)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not errors, errors
    cancelled = ran = 0
    for task_id in task_ids:
        row = task_row(task_id)
        history = [e[1] for e in events(task_id)]
        if cancel_ok[task_id]:
            cancelled += 1
            assert row["status"] == "CANCELLED", row
            assert "STARTED" not in history and outcomes.get(task_id, []) in ([], ["dropped"])
        else:
            ran += 1
            assert row["status"] == "SUCCEEDED", row
            assert history.count("STARTED") == 1 and outcomes[task_id] == ["succeeded"]
    assert cancelled + ran == len(task_ids)


# --- retry --------------------------------------------------------------------------------------------------------


def test_retry_dead_task_gets_a_fresh_budget_and_keeps_its_history(client: TestClient) -> None:
    task_id = new_task(name="demo_fail", payload={"fail": True}, max_retries=1)
    for _ in range(2):
        (item,) = dispatch_all()
        worker.run_attempt(task_id, item.attempt)
    dead = task_row(task_id)
    assert dead["status"] == "DEAD" and dead["attempt"] == 2 and dead["dead_reason"] == "max_retries_exceeded"
    history_before = events(task_id)

    response = client.post(f"/tasks/{task_id}/retry")
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["status"] == "PENDING" and task["id"] == str(task_id)
    assert task["attempt"] == 2, "the attempt (fencing token) is never reset"
    assert task["finished_at"] is None and task["dead_reason"] is None
    row = task_row(task_id)
    assert row["retry_base_attempt"] == 2 and row["dlq_recorded"] is False
    assert abs((row["run_at"] - datetime.now(UTC)).total_seconds()) < 5, "due now"
    assert events(task_id) == [*history_before, ("DEAD", "PENDING", 2)]

    # A fresh budget: max_retries (1) retries again, so two more attempts before DEAD.
    (item,) = dispatch_all()
    assert item.attempt == 3
    assert worker.run_attempt(task_id, item.attempt) == "failed"
    (item,) = dispatch_all()
    assert worker.run_attempt(task_id, item.attempt) == "dead"
    assert task_row(task_id)["attempt"] == 4


def test_retry_cancelled_task(client: TestClient) -> None:
    task_id = new_task()
    (item,) = dispatch_all()
    with db.transaction() as conn:
        assert operations.cancel(conn, task_id).row is not None
    response = client.post(f"/tasks/{task_id}/retry")
    assert response.status_code == 200, response.text
    assert events(task_id)[-2:] == [("ENQUEUED", "CANCELLED", 1), ("CANCELLED", "PENDING", 1)]
    # The message sent before the cancel is still stale: only the new dispatch runs.
    assert worker.run_attempt(task_id, item.attempt) == "dropped"
    (again,) = dispatch_all()
    assert again.attempt == 2 and worker.run_attempt(task_id, again.attempt) == "succeeded"


@pytest.mark.parametrize(
    ("prepare", "status"),
    [
        pytest.param(lambda task_id: None, "PENDING", id="pending"),
        pytest.param(lambda task_id: dispatch_all(), "ENQUEUED", id="enqueued"),
        pytest.param(to_started, "STARTED", id="started"),
        pytest.param(_fail_now, "FAILED", id="failed"),
        pytest.param(_succeed, "SUCCEEDED", id="succeeded"),
    ],
)
def test_retry_refuses_other_statuses(client: TestClient, prepare: Any, status: str) -> None:
    task_id = new_task()
    prepare(task_id)
    before = task_row(task_id)
    response = client.post(f"/tasks/{task_id}/retry")
    assert response.status_code == 409, response.text
    assert status in response.json()["detail"] and "DEAD" in response.json()["detail"]
    assert task_row(task_id) == before


_switch = {"fail": True}


@handlers.task("test_operations_switch")
def _switchable(payload: dict[str, Any]) -> dict[str, Any]:
    if _switch["fail"]:
        raise RuntimeError("switched to fail")
    return {"ran": True}


def test_replayed_dead_task_runs_again_and_a_second_death_adds_a_dlq_row(
    client: TestClient, redis_client: Any, services: Any
) -> None:
    task_id = _create(client, name="demo_fail", payload={"fail": True}, max_retries=0)["id"]
    tid = uuid.UUID(task_id)
    (item,) = dispatch_all()
    assert worker.run_attempt(tid, item.attempt) == "dead"
    assert _record_dlq_messages(redis_client, services.redis_key_prefix) == 1
    assert task_row(tid)["dlq_recorded"] is True

    assert client.post(f"/tasks/{task_id}/retry").json()["status"] == "PENDING"
    (item,) = dispatch_all()
    assert item.attempt == 2
    assert worker.run_attempt(tid, item.attempt) == "dead"
    assert _record_dlq_messages(redis_client, services.redis_key_prefix) == 1
    dlq = [e for e in client.get("/dlq").json() if e["task_id"] == task_id]
    assert [(e["attempt"], e["reason"]) for e in dlq] == [(2, "max_retries_exceeded"), (1, "max_retries_exceeded")]
    assert [e[1] for e in events(tid)] == [
        "PENDING", "ENQUEUED", "STARTED", "DEAD", "PENDING", "ENQUEUED", "STARTED", "DEAD",
    ]  # fmt: skip


def test_replayed_dead_task_can_succeed(client: TestClient) -> None:
    _switch["fail"] = True
    try:
        task_id = uuid.UUID(_create(client, name="test_operations_switch", max_retries=0)["id"])
        (item,) = dispatch_all()
        assert worker.run_attempt(task_id, item.attempt) == "dead"
        _switch["fail"] = False
        assert client.post(f"/tasks/{task_id}/retry").status_code == 200
        (item,) = dispatch_all()
        assert worker.run_attempt(task_id, item.attempt) == "succeeded"
    finally:
        _switch["fail"] = True
    task = client.get(f"/tasks/{task_id}").json()
    assert task["status"] == "SUCCEEDED" and task["result"] == {"ran": True} and task["last_error"] is None


# --- POST /dlq/retry ----------------------------------------------------------------------------------------------


def test_dlq_retry_with_filters(client: TestClient) -> None:
    def dead(name: str, reason: DlqReason = DlqReason.MAX_RETRIES_EXCEEDED) -> uuid.UUID:
        task_id = new_task(name=name)
        to_dead(task_id, reason)
        return task_id

    email_max = [dead("demo_fail") for _ in range(3)]
    email_stuck = dead("demo_fail", DlqReason.STUCK_TASK_TIMEOUT)
    other = dead("demo_ok")
    alive = new_task(name="demo_fail")
    with db.transaction() as conn:  # one of them died a day ago
        conn.execute(
            text("UPDATE tasks SET finished_at = finished_at - interval '1 day' WHERE id = :id"), {"id": email_max[0]}
        )

    def retry(body: dict[str, Any] | None) -> int:
        response = client.post("/dlq/retry", json=body) if body is not None else client.post("/dlq/retry")
        assert response.status_code == 200, response.text
        return int(response.json()["retried"])

    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert retry({"name": "demo_fail", "reason": "max_retries_exceeded", "since": since}) == 2
    assert [task_row(t)["status"] for t in email_max] == ["DEAD", "PENDING", "PENDING"]
    assert retry({"reason": "stuck_task_timeout"}) == 1
    assert task_row(email_stuck)["status"] == "PENDING"
    assert retry({"name": "nothing_by_this_name"}) == 0
    assert retry(None) == 2  # everything still DEAD: email_max[0] and other
    assert task_row(other)["status"] == "PENDING" and task_row(alive)["status"] == "PENDING"
    assert events(other)[-1] == ("DEAD", "PENDING", 1)
    assert _count("SELECT count(*) FROM tasks WHERE status = 'DEAD'") == 0
    assert retry({}) == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"reason": "bored"}, id="unknown-reason"),
        pytest.param({"since": "yesterday"}, id="since-garbage"),
        pytest.param({"since": "2030-01-01T00:00:00"}, id="since-naive"),
        pytest.param({"since": 1893456000}, id="since-epoch"),
        pytest.param({"status": "DEAD"}, id="unknown-field"),
        pytest.param([], id="list"),
    ],
)
def test_dlq_retry_rejects(client: TestClient, body: Any) -> None:
    task_id = new_task()
    to_dead(task_id)
    response = client.post("/dlq/retry", json=body)
    assert response.status_code == 422, response.text
    assert task_row(task_id)["status"] == "DEAD"


# --- idempotency keys ---------------------------------------------------------------------------------------------


def test_same_key_same_body_returns_the_first_task(client: TestClient) -> None:
    body = {"name": "demo_ok", "payload": {"to": "a@example.com"}, "idempotency_key": "order-42"}
    first = client.post("/tasks", json=body)
    assert first.status_code == 201, first.text
    again = client.post("/tasks", json=body)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert first.json()["idempotency_key"] == "order-42"
    # The header means the same; defaults spelled out are the same request.
    header = client.post(
        "/tasks",
        json={"name": "demo_ok", "payload": {"to": "a@example.com"}, "priority": 5, "max_retries": 3},
        headers={"Idempotency-Key": "order-42"},
    )
    assert header.status_code == 200 and header.json()["id"] == first.json()["id"]
    assert _count("SELECT count(*) FROM tasks") == 1
    assert _count("SELECT count(*) FROM task_events") == 1


def test_same_key_different_body_is_a_conflict(client: TestClient) -> None:
    first = client.post("/tasks", json={"name": "demo_ok", "payload": {"n": 1}}, headers={"Idempotency-Key": "k"})
    assert first.status_code == 201
    for body in (
        {"name": "demo_ok", "payload": {"n": 2}},
        {"name": "demo_ok", "payload": {"n": 1}, "priority": 9},
        {"name": "demo_fail", "payload": {"n": 1}},
    ):
        response = client.post("/tasks", json=body, headers={"Idempotency-Key": "k"})
        assert response.status_code == 409, response.text
        assert "different request" in response.json()["detail"]
    assert _count("SELECT count(*) FROM tasks") == 1


def test_run_at_in_another_offset_is_the_same_request(client: TestClient) -> None:
    key = {"name": "demo_ok", "idempotency_key": "t"}
    first = client.post("/tasks", json={**key, "run_at": "2030-06-01T14:00:00+02:00"})
    again = client.post("/tasks", json={**key, "run_at": "2030-06-01T12:00:00Z"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


def test_replay_after_run_at_has_passed_still_returns_the_task(client: TestClient, settings: Any) -> None:
    run_at = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    body = {"name": "demo_ok", "run_at": run_at, "idempotency_key": "l"}
    first = client.post("/tasks", json=body)
    assert first.status_code == 201, first.text
    # Sent again when that run_at is past the grace (here: an API with no grace at all), the same
    # request still answers with its task rather than a 422.
    with TestClient(create_app(settings.model_copy(update={"run_at_grace_sec": 0.0}))) as strict:
        again = strict.post("/tasks", json=body)
        assert again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        assert strict.post("/tasks", json={**body, "idempotency_key": "new"}).status_code == 422


def test_header_and_body_keys_must_agree(client: TestClient) -> None:
    response = client.post("/tasks", json={"name": "demo_ok", "idempotency_key": "a"}, headers={"Idempotency-Key": "b"})
    assert response.status_code == 422, response.text
    assert "Idempotency-Key" in str(response.json()["detail"])
    same = client.post("/tasks", json={"name": "demo_ok", "idempotency_key": "a"}, headers={"Idempotency-Key": "a"})
    assert same.status_code == 201
    assert client.post("/tasks", json={"name": "demo_ok", "idempotency_key": ""}).status_code == 422
    assert client.post("/tasks", json={"name": "demo_ok", "idempotency_key": "x" * 201}).status_code == 422
    assert client.post("/tasks", json={"name": "demo_ok", "idempotency_key": 7}).status_code == 422


def test_a_key_with_a_bad_request_creates_nothing(client: TestClient) -> None:
    response = client.post("/tasks", json={"name": "no_such_handler", "idempotency_key": "k1"})
    assert response.status_code == 422
    assert client.post("/tasks", json={"name": "demo_ok", "idempotency_key": "k1"}).status_code == 201


def test_twenty_concurrent_creates_with_one_key_make_one_task(live_api: Any) -> None:
    body = {"name": "demo_ok", "payload": {"order": 42}, "idempotency_key": "concurrent-order-42"}
    barrier = threading.Barrier(20)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(base_url=live_api.url, timeout=30) as http:
            barrier.wait()
            response = http.post("/tasks", json=body)
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=post) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(r.status_code for r in responses) == [200] * 19 + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert _count("SELECT count(*) FROM tasks") == 1
    assert _count("SELECT count(*) FROM task_events") == 1


def test_concurrent_store_creates_with_one_key(settings: Any) -> None:
    """The same race on the store alone, with every transaction held open until all have inserted."""
    spec = creation.NewTask(
        name="demo_ok", payload={}, priority=5, queue="default", run_at=None, max_retries=3, timeout_sec=None,
        idempotency_key="store-race", request_hash="h",
    )  # fmt: skip
    barrier = threading.Barrier(8)
    results: list[creation.CreateResult] = []
    lock = threading.Lock()

    def create() -> None:
        barrier.wait()
        with db.transaction() as conn:
            (result,) = creation.create_tasks(conn, [spec])
        with lock:
            results.append(result)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(r.created for r in results) == [False] * 7 + [True]
    assert len({r.row["id"] for r in results}) == 1


# --- POST /tasks/batch --------------------------------------------------------------------------------------------


def test_batch_creates_every_task_in_order(client: TestClient) -> None:
    tasks = [{"name": "demo_ok", "payload": {"n": n}, "priority": 1 + n % 10} for n in range(1000)]
    response = client.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] == 1000
    assert [t["payload"]["n"] for t in body["tasks"]] == list(range(1000))
    assert [t["priority"] for t in body["tasks"]] == [1 + n % 10 for n in range(1000)]
    assert body["tasks"][8]["queue"] == "high" and body["tasks"][0]["queue"] == "low"
    assert _count("SELECT count(*) FROM tasks") == 1000
    assert _count("SELECT count(*) FROM task_events WHERE to_status = 'PENDING'") == 1000
    assert client.get(f"/tasks/{body['tasks'][500]['id']}").json()["payload"] == {"n": 500}


@pytest.mark.parametrize(
    ("tasks", "loc"),
    [
        pytest.param(
            [{"name": "demo_ok"}, {"name": "no_such_handler"}], ["body", "tasks", 1, "name"], id="unknown-name"
        ),
        pytest.param(
            [{"name": "demo_ok"}, {"name": "demo_ok", "priority": 11}], ["body", "tasks", 1, "priority"], id="priority"
        ),
        pytest.param(
            [{"name": "demo_ok", "run_at": "2001-01-01T00:00:00Z"}, {"name": "demo_ok"}],
            ["body", "tasks", 0, "run_at"],
            id="run_at-past",
        ),
        pytest.param([], ["body", "tasks"], id="empty"),
        pytest.param([{"name": "demo_ok"}] * 1001, ["body", "tasks"], id="1001-tasks"),
    ],
)
def test_batch_is_all_or_nothing(client: TestClient, tasks: list[dict[str, Any]], loc: list[Any]) -> None:
    response = client.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 422, response.text
    assert any(item["loc"] == loc for item in response.json()["detail"]), response.json()["detail"]
    assert _count("SELECT count(*) FROM tasks") == 0


def test_batch_reports_every_bad_task(client: TestClient) -> None:
    tasks = [{"name": "nope"}, {"name": "demo_ok"}, {"name": "nope_either"}]
    response = client.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 422
    locs = [item["loc"] for item in response.json()["detail"]]
    assert locs == [["body", "tasks", 0, "name"], ["body", "tasks", 2, "name"]]


def test_batch_with_idempotency_keys(client: TestClient) -> None:
    existing = _create(client, payload={"n": 0}, idempotency_key="k0")
    tasks = [
        {"name": "demo_ok", "payload": {"n": 0}, "idempotency_key": "k0"},
        {"name": "demo_ok", "payload": {"n": 1}, "idempotency_key": "k1"},
        {"name": "demo_ok", "payload": {"n": 1}, "idempotency_key": "k1"},
        {"name": "demo_ok", "payload": {"n": 2}},
    ]
    response = client.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] == 2
    ids = [t["id"] for t in body["tasks"]]
    assert ids[0] == existing["id"] and ids[1] == ids[2] and len(set(ids)) == 3
    again = client.post("/tasks/batch", json={"tasks": tasks[:3]})
    assert again.status_code == 200 and again.json()["created"] == 0
    assert [t["id"] for t in again.json()["tasks"]] == ids[:3]
    assert _count("SELECT count(*) FROM tasks") == 3


@pytest.mark.parametrize(
    "tasks",
    [
        pytest.param(
            [{"name": "demo_ok", "idempotency_key": "k0", "payload": {"other": True}}, {"name": "demo_ok"}],
            id="key-of-an-existing-task",
        ),
        pytest.param(
            [{"name": "demo_ok", "idempotency_key": "dup"}, {"name": "demo_fail", "idempotency_key": "dup"}],
            id="key-twice-in-the-batch",
        ),
    ],
)
def test_batch_conflicting_key_creates_nothing(client: TestClient, tasks: list[dict[str, Any]]) -> None:
    _create(client, idempotency_key="k0")
    response = client.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 409, response.text
    assert _count("SELECT count(*) FROM tasks") == 1


def test_batch_replayed_after_run_at_has_passed_returns_its_tasks(client: TestClient, settings: Any) -> None:
    run_at = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    tasks = [{"name": "demo_ok", "payload": {"n": n}, "run_at": run_at, "idempotency_key": f"b{n}"} for n in range(3)]
    first = client.post("/tasks/batch", json={"tasks": tasks})
    assert first.status_code == 201, first.text
    ids = [t["id"] for t in first.json()["tasks"]]
    # Sent again once that run_at is past the grace (here: an API with no grace at all), as POST /tasks.
    with TestClient(create_app(settings.model_copy(update={"run_at_grace_sec": 0.0}))) as strict:
        again = strict.post("/tasks/batch", json={"tasks": tasks})
        assert again.status_code == 200, again.text
        assert [t["id"] for t in again.json()["tasks"]] == ids and again.json()["created"] == 0

        # Replayed tasks and new ones: only the new ones are held to the run_at check.
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        mixed = [*tasks, {"name": "demo_ok", "run_at": future}, {"name": "demo_ok", "idempotency_key": "b9"}]
        response = strict.post("/tasks/batch", json={"tasks": mixed})
        assert response.status_code == 201, response.text
        assert [t["id"] for t in response.json()["tasks"]][:3] == ids and response.json()["created"] == 2

        late = [
            *tasks,
            {"name": "demo_ok", "run_at": run_at, "idempotency_key": "new"},
            {"name": "demo_ok", "run_at": run_at},
        ]
        refused = strict.post("/tasks/batch", json={"tasks": late})
        assert refused.status_code == 422, refused.text
        locs = [e["loc"] for e in refused.json()["detail"]]
        assert locs == [["body", "tasks", 3, "run_at"], ["body", "tasks", 4, "run_at"]]

        changed = strict.post("/tasks/batch", json={"tasks": [{**tasks[0], "payload": {"n": 99}}]})
        assert changed.status_code == 409, changed.text
    assert _count("SELECT count(*) FROM tasks") == 5


def test_batch_refuses_the_idempotency_key_header(client: TestClient) -> None:
    response = client.post("/tasks/batch", json={"tasks": [{"name": "demo_ok"}]}, headers={"Idempotency-Key": "b"})
    assert response.status_code == 422
    assert _count("SELECT count(*) FROM tasks") == 0


def test_a_response_is_sent_only_once_its_transaction_committed(live_api: Any) -> None:
    """What a client is told has happened has happened: read from another connection right after."""
    with httpx.Client(base_url=live_api.url, timeout=10) as http:
        for _ in range(30):
            created = http.post("/tasks", json={"name": "demo_ok", "run_at": "2030-01-01T00:00:00Z"})
            assert created.status_code == 201
            task_id = uuid.UUID(created.json()["id"])
            assert task_row(task_id)["status"] == "PENDING"
            assert http.post(f"/tasks/{task_id}/cancel").status_code == 200
            assert task_row(task_id)["status"] == "CANCELLED"


def test_idempotency_key_header_with_nul_is_a_422(client: TestClient) -> None:
    response = client.post("/tasks", json={"name": "demo_ok"}, headers={"Idempotency-Key": "a\x00b"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
