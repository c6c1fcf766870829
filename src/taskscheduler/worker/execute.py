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
from taskscheduler.worker.outcomes import NextClaim, record_outcome, record_success_and_claim
from taskscheduler.worker.results import error_text, storable_result
from taskscheduler.worker.slicing import MessageSlice, process_slicer

log = logging.getLogger(__name__)


# What running one attempt leaves for the loop over a message: its outcome, the next attempt of the
# message if this one took it, and that attempt's claim if it was written together with the outcome.
_Step = tuple[str, Attempt | None, NextClaim | None]


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
    return _step((task_id, attempt), None, worker=worker, database=database or process.database(), take=None)[0]


def _step(
    item: Attempt,
    claim: NextClaim | None,
    *,
    worker: str | None,
    database: Database,
    take: Callable[[], Attempt | None] | None,
) -> _Step:
    """Run `item` (claiming it first unless `claim` says it was claimed). With `take` (the message's
    next attempt, if any), a success is written together with the next attempt's claim: one round
    trip and one commit instead of two."""
    task_id, attempt = item
    settings = get_settings()
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    if claim is None:
        # Names this claim, so that sending it again after a lost reply finds the claim it made.
        claim_token = uuid.uuid4()
        claimed = persistently(
            database,
            lambda conn: transitions.claim(conn, task_id=task_id, attempt=attempt, worker=worker, token=claim_token),
            within_sec=settings.worker_db_retry_sec,
            what="claim the attempt",
            fields=fields,
        )
    else:
        claimed = claim.claimed
    if claimed is None:
        log.info("stale message dropped", extra={**fields, "event": "dropped"})
        return "dropped", take() if take else None, None
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
        following = take() if take is not None and error is None else None
        if following is not None and following[0] != task_id:
            together = record_success_and_claim(
                database, task_id, attempt, result,
                following=following, worker=worker, heartbeats=heartbeats, settings=settings,
            )  # fmt: skip
            if together is not None:
                outcome, next_claim = together
                return outcome, following, next_claim
        outcome = record_outcome(
            database, task_id, attempt, claimed,
            result=result, error=error, timed_out=timed_out, heartbeats=heartbeats, settings=settings,
        )  # fmt: skip
    if following is None and take is not None:
        following = take()
    return outcome, following, None


def run_attempts(
    items: Sequence[Attempt],
    *,
    worker: str | None = None,
    send_back: Callable[[Sequence[Attempt]], None] | None = None,
    database: Database | None = None,
) -> list[str]:
    """Run the attempts of one message in turn, each claimed only as it starts: the first on its
    own, each next one together with the success of the one before (`SUCCEED_AND_CLAIM`).

    MESSAGE_SLICE_SEC after the message starts, the attempts not yet started are handed to
    `send_back` (a new message on the same queue), even while an attempt runs, so that a slow task
    does not hold up the others while other pool processes are idle. They are still ENQUEUED, so this
    is safe, and if that publish fails the lost-message sweep sends them.
    """
    database = database or process.database()
    if send_back is None or len(items) < 2:
        message = MessageSlice(items, deadline=float("inf"), send_back=lambda rest: None)
        return _run_message(message, worker=worker, database=database)
    message = MessageSlice(items, deadline=time.monotonic() + broker.MESSAGE_SLICE_SEC, send_back=send_back)
    with process_slicer().watching(message):
        return _run_message(message, worker=worker, database=database)


def _run_message(message: MessageSlice, *, worker: str | None, database: Database) -> list[str]:
    outcomes: list[str] = []
    item = message.take()
    claim: NextClaim | None = None
    while item is not None:
        outcome, item, claim = _step(item, claim, worker=worker, database=database, take=message.take)
        outcomes.append(outcome)
    return outcomes
