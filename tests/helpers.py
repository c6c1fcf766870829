"""Small helpers for tests: create tasks and walk them through the real transitions, read the
broker's queues, run the CLI in process. Servers, processes and waiting are in tests/harness.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from typer.testing import CliRunner, Result

from taskscheduler.lifecycle import DlqReason, queue_for_priority
from taskscheduler.store import creation, db, operations, sweeps, transitions
from tests.harness import free_port as free_port  # the tests import these two from here too
from tests.harness import wait_until as wait_until


def new_task(
    *,
    name: str = "demo_ok",
    payload: dict[str, Any] | None = None,
    priority: int = 5,
    run_at: datetime | None = None,
    max_retries: int = 3,
    timeout_sec: float | None = None,
) -> uuid.UUID:
    with db.transaction() as conn:
        row = creation.create_task(
            conn,
            name=name,
            payload=payload or {},
            priority=priority,
            queue=queue_for_priority(priority).value,
            run_at=run_at,
            max_retries=max_retries,
            timeout_sec=timeout_sec,
        )
    return row["id"]


def far_future() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)


def dispatch_all(now: datetime | None = None) -> list[sweeps.Dispatched]:
    with db.transaction() as conn:
        return sweeps.dispatch_due(conn, limit=10_000, now=now or far_future())


def to_started(task_id: uuid.UUID) -> int:
    """PENDING -> ENQUEUED -> STARTED through the store; returns the attempt."""
    (item,) = [d for d in dispatch_all() if d.id == task_id]
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=task_id, attempt=item.attempt) is not None
    return item.attempt


def to_dead(task_id: uuid.UUID, reason: DlqReason = DlqReason.MAX_RETRIES_EXCEEDED) -> int:
    attempt = to_started(task_id)
    with db.transaction() as conn:
        assert transitions.kill(conn, task_id=task_id, attempt=attempt, error="boom", reason=reason)
    return attempt


def task_row(task_id: uuid.UUID) -> dict[str, Any]:
    with db.transaction() as conn:
        row = operations.get_task(conn, task_id)
    assert row is not None
    return dict(row)


def events(task_id: uuid.UUID) -> list[tuple[str | None, str, int]]:
    with db.transaction() as conn:
        return [(e["from_status"], e["to_status"], e["attempt"]) for e in operations.list_events(conn, task_id)]


def backdate(task_id: uuid.UUID, **columns: timedelta) -> None:
    """Move timestamps (not statuses) into the past: `backdate(id, heartbeat_at=timedelta(minutes=5))`."""
    sets = ", ".join(f"{col} = {col} - :{col}" for col in columns)
    with db.transaction() as conn:
        conn.execute(text(f"UPDATE tasks SET {sets} WHERE id = :id"), {"id": task_id, **columns})


def queued(redis_client: Any, prefix: str, queue: str) -> list[tuple[str, ...]]:
    """The argument tuples of the Celery messages waiting in `queue` (oldest first)."""
    import base64
    import json

    out = []
    for raw in reversed(redis_client.lrange(f"{prefix}{queue}", 0, -1)):
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        out.append(tuple(args))
    return out


def queued_attempts(redis_client: Any, prefix: str, queue: str) -> list[tuple[str, int]]:
    """The `(task_id, attempt)` pairs the messages waiting in a task queue carry, in order."""
    return [(task_id, attempt) for (items,) in queued(redis_client, prefix, queue) for task_id, attempt in items]


def cli_run(*args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI in this process, as `taskscheduler ARGS`; it must end by exiting, never by a traceback."""
    from taskscheduler.cli import app

    result = CliRunner().invoke(app, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line_error(result: Result, code: int) -> str:
    """The one `error: ...` line a failed command printed, after checking its exit code."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]
