"""Running attempts: claim one, run its handler under its time limit while it heartbeats, write
its outcome; and the attempts of one message in turn, within the message's slice.

Everything the worker learns or decides is written through the guarded transitions in `store`, so
a duplicate message or a worker that wakes up after being declared stuck changes nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from taskscheduler import broker, handlers
from taskscheduler.broker import Attempt
from taskscheduler.config import get_settings
from taskscheduler.store import transitions
from taskscheduler.store.db import Database
from taskscheduler.worker import process
from taskscheduler.worker.db_retry import persistently
from taskscheduler.worker.heartbeats import process_heartbeats
from taskscheduler.worker.limits import AttemptTimedOut, time_limit
from taskscheduler.worker.outcomes import record_outcome
from taskscheduler.worker.results import error_text, storable_result
from taskscheduler.worker.slicing import MessageSlice, process_slicer

log = logging.getLogger(__name__)


def run_attempt(
    task_id: uuid.UUID, attempt: int, *, worker: str | None = None, database: Database | None = None
) -> str:
    """Claim, run and record one attempt. Returns what happened, for logs and tests: "dropped",
    "succeeded", "failed", "dead", "fenced" or "unrecorded" (the outcome could not be written).

    `worker` (the Celery node name) is recorded on the STARTED event, to show who ran it. Only a
    claim that cannot be made for WORKER_DB_RETRY_SEC raises (GaveUp): the task is still ENQUEUED
    (or STARTED without a heartbeat), and the sweeps take it from there. `database`: default, this
    worker process's (`process.database()`).
    """
    settings = get_settings()
    database = database or process.database()
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    # Names this claim, so that sending it again after a lost reply finds the claim it made.
    claim_token = uuid.uuid4()
    claimed = persistently(
        database,
        lambda conn: transitions.claim(conn, task_id=task_id, attempt=attempt, worker=worker, token=claim_token),
        within_sec=settings.worker_db_retry_sec,
        what="claim the attempt",
        fields=fields,
    )
    if claimed is None:
        log.info("stale message dropped", extra={**fields, "event": "dropped"})
        return "dropped"
    log.info("ENQUEUED -> STARTED", extra={**fields, "event": "started", "task_name": claimed.name})

    handler = handlers.get_handler(claimed.name)
    timeout = claimed.timeout_sec or settings.stuck_after_sec
    error: str | None = None
    timed_out = False
    result: Any = None
    heartbeats = process_heartbeats(database, settings.heartbeat_sec)
    # The outcome is written inside the block too: while a write waits for the database to come
    # back, the attempt keeps heartbeating, so it is not declared stuck meanwhile.
    with heartbeats.beating(task_id, attempt):
        token = handlers.current_attempt.set(attempt - claimed.retry_base_attempt)
        try:
            with time_limit(timeout):
                if handler is None:
                    raise handlers.HandlerError(f"no handler registered for {claimed.name!r} (check TASK_MODULES)")
                result = storable_result(handlers.run(handler, claimed.payload), max_bytes=settings.max_result_bytes)
        except AttemptTimedOut:
            timed_out = True
            error = f"timed out after {timeout:g}s"
        except Exception as exc:  # any handler failure is a failed attempt
            error = error_text(exc)
        finally:
            handlers.current_attempt.reset(token)
        return record_outcome(
            database, task_id, attempt, claimed,
            result=result, error=error, timed_out=timed_out, heartbeats=heartbeats, settings=settings,
        )  # fmt: skip


def run_attempts(
    items: Sequence[Attempt],
    *,
    worker: str | None = None,
    send_back: Callable[[Sequence[Attempt]], None] | None = None,
    database: Database | None = None,
) -> list[str]:
    """Run the attempts of one message in turn, each claimed only as it starts.

    MESSAGE_SLICE_SEC after the message starts, the attempts not yet started are handed to
    `send_back` (a new message on the same queue), even while an attempt runs, so that a slow task
    does not hold up the others while other pool processes are idle. They are still ENQUEUED, so this
    is safe, and if that publish fails the lost-message sweep sends them.
    """
    database = database or process.database()
    if send_back is None or len(items) < 2:
        return [run_attempt(task_id, attempt, worker=worker, database=database) for task_id, attempt in items]
    message = MessageSlice(items, deadline=time.monotonic() + broker.MESSAGE_SLICE_SEC, send_back=send_back)
    outcomes: list[str] = []
    with process_slicer().watching(message):
        while (item := message.take()) is not None:
            outcomes.append(run_attempt(*item, worker=worker, database=database))
    return outcomes
