"""LOG_FORMAT=json: one JSON object per line, with task_id, attempt and event; no payload, no API key, ever."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.helpers import backdate, queued

from taskscheduler import broker, worker
from taskscheduler.api import create_app
from taskscheduler.config import Settings
from taskscheduler.logs import configure_logging
from taskscheduler.scheduler import dispatch, rescue, retention
from taskscheduler.store import db, sweeps, transitions

SECRET_PAYLOAD = "hunter2-payload-secret"
SECRET_RESULT = "result-secret-value"
API_KEY = "sekret-api-key-123"
WRONG_KEY = "wrong-api-key-456"


class Recorder:
    def publish_attempts(self, items: Sequence[sweeps.Dispatched]) -> int:
        return len(items)

    def publish_dead(self, items: Sequence[Any]) -> int:
        return len(items)


def _lifecycle(settings: Settings, redis_client: Any, prefix: str) -> None:
    """Create, fail, retry, die, record in the DLQ, be rescued: most of what logs a line."""
    secured = settings.model_copy(update={"api_keys": API_KEY})
    with TestClient(create_app(secured)) as client:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        body = {"name": "demo_fail", "payload": {"fail": True, "password": SECRET_PAYLOAD}, "max_retries": 1}
        assert client.post("/tasks", json=body, headers=auth).status_code == 201
        ok = client.post("/tasks", json={"name": "demo_ok", "payload": {"token": SECRET_RESULT}}, headers=auth)
        assert ok.status_code == 201
        assert client.get("/tasks", headers={"Authorization": f"Bearer {WRONG_KEY}"}).status_code == 401
        # A stuck task, rescued below.
        stuck = uuid.UUID(client.post("/tasks", json={"name": "demo_ok", "max_retries": 0}, headers=auth).json()["id"])
    for _ in range(2):
        for item in task_store_dispatch(settings):
            if item.id == stuck:
                with db.transaction() as conn:  # claimed by a worker that then dies
                    transitions.claim(conn, task_id=stuck, attempt=item.attempt)
            else:
                worker.run_attempt(item.id, item.attempt, worker="test-worker")
    for args in queued(redis_client, prefix, "dlq"):
        worker.record_dead(*args)
    backdate(stuck, heartbeat_at=timedelta(hours=1), started_at=timedelta(hours=1))
    assert rescue.run_once(database=db.database_for(), settings=settings, publisher=Recorder()).dead == 1
    retention.run_once(database=db.database_for(), settings=settings)


def task_store_dispatch(settings: Settings) -> list[sweeps.Dispatched]:
    """The scheduler's dispatch (it logs each task it enqueues), returning what it enqueued."""
    recorded: list[sweeps.Dispatched] = []

    class Keep(Recorder):
        def publish_attempts(self, items: Sequence[sweeps.Dispatched]) -> int:
            recorded.extend(items)
            return len(items)

    with db.transaction() as conn:  # everything is due now: make sure, whatever the backoff drew
        conn.exec_driver_sql("UPDATE tasks SET run_at = now() WHERE status IN ('PENDING', 'FAILED')")
    dispatch.run_once(database=db.database_for(), settings=settings, publisher=Keep())
    return recorded


def test_json_logs_are_one_object_per_line_with_task_fields_and_no_secrets(
    settings: Settings, redis_client: Any, services: Any, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    broker.configure_celery(settings)
    configure_logging("json", "INFO")
    _lifecycle(settings, redis_client, services.redis_key_prefix)
    err = capsys.readouterr().err

    entries = []
    for line in err.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "msg"} <= set(entry), line
        entries.append(entry)
    ours = [e for e in entries if e["logger"].startswith("taskscheduler")]
    per_task = [e for e in ours if "task_id" in e]
    assert per_task, err
    for entry in per_task:
        assert uuid.UUID(entry["task_id"]) and isinstance(entry["attempt"], int) and entry["event"], entry
    events = {e["event"] for e in per_task}
    assert {"enqueued", "started", "failed", "dead", "succeeded", "dlq", "rescued"} <= events, events

    for secret in (SECRET_PAYLOAD, SECRET_RESULT, API_KEY, WRONG_KEY):
        assert secret not in err, f"{secret!r} appears in the logs"


def test_text_logs_have_no_secrets_either(
    settings: Settings, redis_client: Any, services: Any, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    broker.configure_celery(settings)
    configure_logging("text", "DEBUG")
    _lifecycle(settings, redis_client, services.redis_key_prefix)
    err = capsys.readouterr().err
    assert "task_id=" in err and "event=started" in err
    for secret in (SECRET_PAYLOAD, SECRET_RESULT, API_KEY, WRONG_KEY):
        assert secret not in err, f"{secret!r} appears in the logs"
