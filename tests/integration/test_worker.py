"""The worker's side of a message: several attempts in one message, each claimed as it starts, each
task's own time limit, outcomes PostgreSQL would refuse, and a claim whose reply was lost."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from tests.helpers import dispatch_all, events, far_future, new_task, queued, task_row, to_started

from taskscheduler import broker, handlers, worker
from taskscheduler.config import get_settings
from taskscheduler.store import db, operations, sweeps, transitions
from taskscheduler.store import dlq as dlq_store
from taskscheduler.store.transitions import MAX_ERROR_CHARS
from taskscheduler.worker import execute, outcomes

pytestmark = pytest.mark.usefixtures("settings")


def _dispatched(count: int) -> list[tuple[uuid.UUID, int]]:
    ids = {new_task() for _ in range(count)}
    return [(item.id, item.attempt) for item in dispatch_all() if item.id in ids]


def test_a_message_runs_each_of_its_attempts() -> None:
    items = _dispatched(3)
    assert worker.run_attempts(items) == ["succeeded"] * 3
    assert [task_row(task_id)["status"] for task_id, _ in items] == ["SUCCEEDED"] * 3


def test_attempts_not_started_when_the_slice_ends_go_back_to_the_queue_unclaimed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broker, "MESSAGE_SLICE_SEC", 0.0)
    items = _dispatched(3)
    sent_back: list[Sequence[tuple[uuid.UUID, int]]] = []
    assert worker.run_attempts(items, send_back=sent_back.append) == ["succeeded"]
    assert sent_back == [items[1:]]
    for task_id, _ in items[1:]:
        assert task_row(task_id)["status"] == "ENQUEUED"
        assert "STARTED" not in [to for _, to, _ in events(task_id)]
    # The message sent back runs them.
    assert worker.run_attempts(sent_back[0]) == ["succeeded"] * 2


def test_when_the_rest_cannot_be_sent_back_it_stays_enqueued_for_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker, "MESSAGE_SLICE_SEC", 0.0)
    items = _dispatched(2)

    def broker_down(rest: Sequence[tuple[uuid.UUID, int]]) -> None:
        raise ConnectionError("broker down")

    assert worker.run_attempts(items, send_back=broker_down) == ["succeeded"]
    assert task_row(items[1][0])["status"] == "ENQUEUED"


def test_the_rest_is_sent_back_once_while_a_slow_first_attempt_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker, "MESSAGE_SLICE_SEC", 0.2)
    slow = new_task(name="demo_hang", payload={"sleep_sec": 2})
    ids = [slow, *(new_task() for _ in range(3))]
    attempts = {item.id: item.attempt for item in dispatch_all()}
    items = [(task_id, attempts[task_id]) for task_id in ids]
    sent_back: list[tuple[Sequence[tuple[uuid.UUID, int]], str]] = []

    def send_back(rest: Sequence[tuple[uuid.UUID, int]]) -> None:
        sent_back.append((rest, task_row(slow)["status"]))

    assert worker.run_attempts(items, send_back=send_back) == ["succeeded"]
    # Sent once, while the slow attempt was still running, and none of them also run here.
    assert sent_back == [(items[1:], "STARTED")]
    for task_id, _ in items[1:]:
        assert task_row(task_id)["status"] == "ENQUEUED"
        assert "STARTED" not in [to for _, to, _ in events(task_id)]


def test_a_handler_past_its_task_timeout_fails_the_attempt() -> None:
    task_id = new_task(name="demo_hang", payload={"sleep_sec": 30}, timeout_sec=0.3, max_retries=1)
    (item,) = [d for d in dispatch_all() if d.id == task_id]
    assert worker.run_attempt(task_id, item.attempt) == "failed"
    row = task_row(task_id)
    assert row["status"] == "FAILED" and row["last_error"] == "timed out after 0.3s"
    # The next attempt times out too and, with no retries left, is DEAD for its timeout.
    (item,) = [d for d in dispatch_all() if d.id == task_id]
    assert worker.run_attempt(task_id, item.attempt) == "dead"
    assert task_row(task_id)["dead_reason"] == "stuck_task_timeout"


# --- outcomes that PostgreSQL would refuse, or that are too big -------------------------------------------------


def _run_with(monkeypatch: pytest.MonkeyPatch, handler: Callable[[dict[str, Any]], Any], **task: Any) -> str:
    """Run one attempt of a task whose handler is `handler`."""
    monkeypatch.setitem(handlers._registry, "test_handler", handler)
    task_id = new_task(name="test_handler", **task)
    (item,) = [d for d in dispatch_all() if d.id == task_id]
    return worker.run_attempt(task_id, item.attempt)


def _only_task() -> dict[str, Any]:
    with db.transaction() as conn:
        (task_id,) = conn.execute(text("SELECT id FROM tasks")).scalars()
    return task_row(task_id)


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("result", "error"),
    [
        ("caf\udce9", "the handler's result contains a lone UTF-16 surrogate"),
        ({"k": "nul\x00"}, "the handler's result contains a NUL character"),
        (_nested(300), "the handler's result is nested deeper than 64 levels"),
        ({"blob": "x" * 3_000_000}, "the handler's result is 3000012 bytes as JSON, over MAX_RESULT_BYTES (1048576)"),
    ],
    ids=["lone-surrogate", "nul", "300-deep", "3MB"],
)
def test_a_result_postgres_or_the_api_cannot_take_is_a_failed_attempt_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, result: Any, error: str
) -> None:
    assert _run_with(monkeypatch, lambda payload: result, max_retries=1) == "failed"
    row = _only_task()
    assert row["status"] == "FAILED" and row["result"] is None
    assert row["last_error"].startswith("ResultNotStorable: " + error)


def test_max_result_bytes_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_RESULT_BYTES", "2048")
    get_settings.cache_clear()
    assert _run_with(monkeypatch, lambda payload: "x" * 2046) == "succeeded"
    assert _run_with(monkeypatch, lambda payload: "x" * 2047, max_retries=0) == "dead"
    dead = [t for t in _all_tasks() if t["status"] == "DEAD"]
    assert [t["last_error"] for t in dead] == [
        "ResultNotStorable: the handler's result is 2049 bytes as JSON, over MAX_RESULT_BYTES (2048): store large"
        " data elsewhere and return a reference to it"
    ]


def _all_tasks() -> list[dict[str, Any]]:
    with db.transaction() as conn:
        return [dict(r) for r in conn.execute(text("SELECT * FROM tasks")).mappings()]


def test_an_error_text_with_nul_and_lone_surrogates_is_stored_escaped_and_clipped_everywhere(
    monkeypatch: pytest.MonkeyPatch, redis_client: Any, clean_db: Any
) -> None:
    def handler(payload: dict[str, Any]) -> None:
        raise ValueError("bad\x00 caf\udce9 " + "x" * 1_000_000)

    assert _run_with(monkeypatch, handler, max_retries=1) == "failed"
    row = _only_task()
    assert row["last_error"].startswith("ValueError: bad\\x00 caf\\udce9 xxx")
    assert len(row["last_error"]) == MAX_ERROR_CHARS
    (item,) = dispatch_all()
    assert worker.run_attempt(item.id, item.attempt) == "dead"
    row = _only_task()
    assert row["status"] == "DEAD" and len(row["last_error"]) == MAX_ERROR_CHARS
    with db.transaction() as conn:
        details = [e["detail"] for e in operations.list_events(conn, row["id"])]
    assert all(d is None or len(d) <= MAX_ERROR_CHARS for d in details)
    assert details[-1].startswith("max_retries_exceeded: ValueError: bad\\x00 caf\\udce9 xxx")
    # The DLQ message carries the stored text, and the DLQ recorder clips whatever it is given.
    ((task_id, attempt, name, reason, error),) = queued(redis_client, clean_db.redis_key_prefix, "dlq")
    assert error == row["last_error"]
    assert worker.record_dead(task_id, attempt, name, reason, "raw\x00 caf\udce9 " + "y" * 1_000_000)
    with db.transaction() as conn:
        (event,) = dlq_store.list_dlq_events(conn)
    assert event["error"].startswith("raw\\x00 caf\\udce9 yyy") and len(event["error"]) == MAX_ERROR_CHARS


def test_a_refused_result_that_slips_past_the_checks_is_a_failed_attempt_and_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As if the worker's checks missed a value PostgreSQL refuses: the write itself must not raise
    # (which left the task STARTED), and neither the value nor the statement's parameters reach a log.
    monkeypatch.setattr(execute, "storable_result", lambda value, max_bytes: value, raising=False)
    secret = "SECRET-MARKER caf\udce9 SECRET-MARKER"
    caplog.set_level(logging.DEBUG)
    try:
        outcome = _run_with(monkeypatch, lambda payload: {"card": secret}, max_retries=1)
    except Exception as exc:  # the unfixed worker let it escape, as Celery would then log it
        logging.getLogger("celery").exception("task raised: %s", exc)
        outcome = "raised"
    assert "SECRET-MARKER" not in caplog.text and "parameters" not in caplog.text
    assert outcome == "failed"
    row = _only_task()
    assert row["status"] == "FAILED"
    assert row["last_error"] == ("the handler's result could not be stored: InvalidTextRepresentation (SQLSTATE 22P02)")


def test_bound_parameters_stay_out_of_database_errors() -> None:
    task_id = new_task()
    attempt = to_started(task_id)
    with pytest.raises(DBAPIError) as raised:
        db.database_for().run_statement(
            lambda conn: transitions.succeed(conn, task_id=task_id, attempt=attempt, result="caf\udce9 SECRET-MARKER")
        )
    assert "SECRET-MARKER" not in str(raised.value)


def test_a_deep_result_stored_before_results_were_checked_does_not_break_reading_the_task(client: Any) -> None:
    task_id = new_task()
    attempt = to_started(task_id)
    with db.transaction() as conn:
        assert transitions.succeed(conn, task_id=task_id, attempt=attempt, result=_nested(300))
    response = client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    assert response.json()["result"] == "(not shown: the result is nested deeper than 64 levels)"
    assert response.json()["status"] == "SUCCEEDED"


# --- a claim whose reply was lost --------------------------------------------------------------------------------


@contextmanager
def _after_each_execute(hook: Callable[[psycopg.Cursor[Any], str], None]) -> Iterator[None]:
    """Call `hook(cursor, statement)` after each statement the driver ran, in this process. At the
    driver's cursor rather than SQLAlchemy's events: the worker's per-task statements run on the
    driver's connection directly (`db.fetch_row`)."""
    original = psycopg.Cursor.execute

    def execute(self: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> psycopg.Cursor[Any]:
        result = original(self, query, *args, **kwargs)
        hook(self, query if isinstance(query, str) else str(query))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", execute)
        yield


def test_a_claim_sent_again_after_its_reply_was_lost_finds_its_own_claim() -> None:
    # The reply is lost at the DBAPI boundary: the claim runs and commits on the server (autocommit),
    # then its connection is closed and the driver raises, as when the connection dies before the
    # reply is read. That timing cannot be produced reliably over a real network.
    task_id = new_task()
    (item,) = dispatch_all()
    lost: list[str] = []

    def lose_the_reply(cursor: Any, statement: str) -> None:
        if "started_at = now(), heartbeat_at = now()" in statement and not lost:
            lost.append(statement)
            cursor.connection.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    with _after_each_execute(lose_the_reply):
        outcome = worker.run_attempt(task_id, item.attempt)
    assert lost, "the claim was not intercepted"
    assert outcome == "succeeded"
    assert task_row(task_id)["status"] == "SUCCEEDED"
    assert events(task_id) == [
        (None, "PENDING", 0),
        ("PENDING", "ENQUEUED", 1),
        ("ENQUEUED", "STARTED", 1),
        ("STARTED", "SUCCEEDED", 1),
    ]


def test_a_claim_with_another_token_is_still_refused() -> None:
    task_id = new_task()
    (item,) = dispatch_all()
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=task_id, attempt=item.attempt, token=mine) is not None
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=task_id, attempt=item.attempt, token=theirs) is None
        assert transitions.claim(conn, task_id=task_id, attempt=item.attempt) is None
        assert transitions.claim(conn, task_id=task_id, attempt=item.attempt, token=mine) is not None
    assert [to for _, to, _ in events(task_id)].count("STARTED") == 1


def test_a_dead_attempt_whose_dlq_message_cannot_be_published_is_left_to_the_dlq_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broker_down(items: Any) -> int:
        raise ConnectionError("broker down")

    monkeypatch.setattr(outcomes, "publish_dead", broker_down)

    def handler(payload: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    assert _run_with(monkeypatch, handler, max_retries=0) == "dead"
    row = _only_task()
    assert row["status"] == "DEAD" and not row["dlq_recorded"]
    with db.transaction() as conn:
        (lost,) = sweeps.take_unrecorded_dead(conn, timeout_sec=0, limit=10, now=far_future())
    assert lost.id == row["id"] and lost.error == "RuntimeError: boom"


def test_the_hard_limit_leaves_room_to_write_the_outcome_while_the_database_is_away(
    monkeypatch: pytest.MonkeyPatch, redis_client: Any, clean_db: Any
) -> None:
    """Celery kills a pool process at the message's hard limit: it must come after the longest task
    limit plus the time a worker keeps retrying its outcome's write, or the kill loses that outcome."""
    import json

    monkeypatch.setenv("WORKER_DB_RETRY_SEC", "77")
    get_settings.cache_clear()
    new_task(timeout_sec=20)
    broker.publish_attempts(dispatch_all(), default_timeout_sec=180)
    (raw,) = redis_client.lrange(f"{clean_db.redis_key_prefix}default", 0, -1)
    hard, _soft = json.loads(raw)["headers"]["timelimit"]
    assert hard >= 20 + 77
    get_settings.cache_clear()


# --- the success of one attempt and the claim of the next, in one statement --------------------------------------


def _started_and_enqueued() -> tuple[tuple[uuid.UUID, int], tuple[uuid.UUID, int]]:
    """One attempt STARTED and another ENQUEUED, as in a message of two once the first runs."""
    done_id, next_id = new_task(), new_task()
    attempts = {item.id: item.attempt for item in dispatch_all()}
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=done_id, attempt=attempts[done_id]) is not None
    return (done_id, attempts[done_id]), (next_id, attempts[next_id])


def _succeed_and_claim(done: tuple[uuid.UUID, int], following: tuple[uuid.UUID, int], token: uuid.UUID) -> Any:
    with db.transaction() as conn:
        return transitions.succeed_and_claim(
            conn, task_id=done[0], attempt=done[1], result={"n": 1},
            next_id=following[0], next_attempt=following[1], worker="w1", token=token,
        )  # fmt: skip


def test_the_success_and_the_next_claim_are_written_by_one_statement() -> None:
    done, following = _started_and_enqueued()
    written, claimed = _succeed_and_claim(done, following, uuid.uuid4())
    assert written and claimed is not None and claimed.name == "demo_ok"
    assert task_row(done[0])["status"] == "SUCCEEDED" and task_row(done[0])["result"] == {"n": 1}
    assert events(done[0])[-1] == ("STARTED", "SUCCEEDED", done[1])
    assert task_row(following[0])["status"] == "STARTED"
    assert events(following[0])[-1] == ("ENQUEUED", "STARTED", following[1])


def test_a_stale_success_still_claims_the_next_attempt_and_changes_nothing_else() -> None:
    done, following = _started_and_enqueued()
    # Another attempt's outcome (the task was retried meanwhile): no row matches it.
    written, claimed = _succeed_and_claim((done[0], done[1] + 1), following, uuid.uuid4())
    assert not written and claimed is not None
    assert task_row(done[0])["status"] == "STARTED" and events(done[0])[-1] == ("ENQUEUED", "STARTED", done[1])
    assert task_row(following[0])["status"] == "STARTED"
    # The attempt is no longer STARTED (the stuck sweep failed it, or it already succeeded).
    other, after = _started_and_enqueued()
    with db.transaction() as conn:
        assert transitions.succeed(conn, task_id=other[0], attempt=other[1], result=None)
    written, claimed = _succeed_and_claim(other, after, uuid.uuid4())
    assert not written and claimed is not None
    assert [to for _, to, _ in events(other[0])].count("SUCCEEDED") == 1
    assert task_row(other[0])["result"] is None
    assert task_row(after[0])["status"] == "STARTED"


def test_a_stale_next_attempt_is_not_claimed_and_the_success_is_still_written() -> None:
    done, following = _started_and_enqueued()
    written, claimed = _succeed_and_claim(done, (following[0], following[1] + 1), uuid.uuid4())
    assert written and claimed is None
    assert task_row(following[0])["status"] == "ENQUEUED"
    assert "STARTED" not in [to for _, to, _ in events(following[0])]
    # The next attempt claimed by someone else (a duplicate message): refused, and left as it is.
    other, after = _started_and_enqueued()
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=after[0], attempt=after[1]) is not None
    written, claimed = _succeed_and_claim(other, after, uuid.uuid4())
    assert written and claimed is None
    assert [to for _, to, _ in events(after[0])].count("STARTED") == 1


def test_the_combined_statement_sent_again_after_a_lost_reply_finds_its_own_claim() -> None:
    done, following = _started_and_enqueued()
    token = uuid.uuid4()
    assert _succeed_and_claim(done, following, token)[0]
    written, claimed = _succeed_and_claim(done, following, token)  # the same statement again
    assert not written and claimed is not None and claimed.name == "demo_ok"
    assert [to for _, to, _ in events(done[0])].count("SUCCEEDED") == 1
    assert [to for _, to, _ in events(following[0])].count("STARTED") == 1
    # Another token (another worker's claim) is still refused.
    assert _succeed_and_claim(done, following, uuid.uuid4()) == (False, None)


def test_the_outcome_and_the_claim_must_be_of_different_tasks() -> None:
    done, _ = _started_and_enqueued()
    with pytest.raises(ValueError), db.transaction() as conn:
        transitions.succeed_and_claim(
            conn, task_id=done[0], attempt=done[1], result=None,
            next_id=done[0], next_attempt=done[1], worker=None, token=uuid.uuid4(),
        )  # fmt: skip


def test_a_message_writes_each_next_claim_with_the_success_before_it() -> None:
    items = _dispatched(3)
    statements: list[str] = []
    with _after_each_execute(lambda cursor, statement: statements.append(statement)):
        assert worker.run_attempts(items) == ["succeeded"] * 3
    writes = [s for s in statements if s != "SELECT 1"]
    assert writes == [transitions.CLAIM, transitions.SUCCEED_AND_CLAIM, transitions.SUCCEED_AND_CLAIM,
                      transitions.SUCCEED]  # fmt: skip
    for task_id, attempt in items:
        assert events(task_id)[-2:] == [("ENQUEUED", "STARTED", attempt), ("STARTED", "SUCCEEDED", attempt)]


def test_a_message_whose_combined_statement_lost_its_reply_runs_every_attempt_once() -> None:
    items = _dispatched(2)
    lost: list[str] = []

    def lose_the_reply(cursor: Any, statement: str) -> None:
        if statement == transitions.SUCCEED_AND_CLAIM and not lost:
            lost.append(statement)
            cursor.connection.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    with _after_each_execute(lose_the_reply):
        # The first success committed before its reply was lost: sent again, it matches no row
        # ("fenced", as SUCCEED alone sent again does), while the claim finds its own.
        outcomes_ = worker.run_attempts(items)
    assert lost, "the combined statement was not intercepted"
    assert outcomes_ == ["fenced", "succeeded"]
    for task_id, attempt in items:
        assert task_row(task_id)["status"] == "SUCCEEDED"
        assert events(task_id)[-2:] == [("ENQUEUED", "STARTED", attempt), ("STARTED", "SUCCEEDED", attempt)]


def test_a_refused_result_is_recorded_apart_and_the_next_attempt_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    items = _dispatched(2)
    # A result PostgreSQL refuses (a lone surrogate in jsonb) fails the combined statement as a whole.
    results = iter(["caf\udce9", "ok"])
    monkeypatch.setattr(execute, "storable_result", lambda value, max_bytes: next(results))
    assert worker.run_attempts(items) == ["failed", "succeeded"]
    assert task_row(items[0][0])["status"] == "FAILED"
    assert task_row(items[1][0])["status"] == "SUCCEEDED"
