"""Writing an attempt's outcome: SUCCEEDED, or FAILED / DEAD as the failure policy says.

Every write is a guarded transition in `store`: one that matches no row means the attempt was taken
away meanwhile (fenced), and its outcome is discarded.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from taskscheduler.broker import Attempt, DeadMessage, publish_dead
from taskscheduler.config import Settings
from taskscheduler.lifecycle import DeadWith, RetryAfter, failure_outcome
from taskscheduler.store import transitions
from taskscheduler.store.db import Database
from taskscheduler.worker.db_retry import GaveUp, describe, persistently
from taskscheduler.worker.heartbeats import Heartbeats

log = logging.getLogger(__name__)


def record_outcome(
    database: Database,
    task_id: uuid.UUID,
    attempt: int,
    claimed: transitions.Claimed,
    *,
    result: Any,
    error: str | None,
    timed_out: bool,
    heartbeats: Heartbeats,
    settings: Settings,
) -> str:
    """Write the attempt's outcome (inside its `beating` block): its result, or its `error`."""
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    with heartbeats.recording(task_id, attempt):
        if error is None:
            try:
                return _record_success(database, task_id, attempt, result, fields=fields, settings=settings)
            except SQLAlchemyError as exc:  # refused by the database all the same: a failed attempt
                error = f"the handler's result could not be stored: {describe(exc)}"
                log.warning(
                    "result refused by the database (%s); recording a failed attempt",
                    describe(exc),
                    extra={**fields, "event": "result_refused"},
                )
        outcome = failure_outcome(
            attempt=attempt,
            max_retries=claimed.max_retries,
            retry_base_attempt=claimed.retry_base_attempt,
            timed_out=timed_out,
            backoff_base_sec=settings.retry_backoff_base_sec,
            backoff_max_sec=settings.retry_backoff_max_sec,
        )
        return record_failure(database, task_id, attempt, error=error, outcome=outcome, settings=settings)


@dataclass(frozen=True)
class NextClaim:
    """The claim of a message's next attempt, written together with the outcome of the one before:
    what it returned (None: the next attempt was stale, as `transitions.claim` says)."""

    claimed: transitions.Claimed | None


def record_success_and_claim(
    database: Database,
    task_id: uuid.UUID,
    attempt: int,
    result: Any,
    *,
    following: Attempt,
    worker: str | None,
    heartbeats: Heartbeats,
    settings: Settings,
) -> tuple[str, NextClaim | None] | None:
    """STARTED -> SUCCEEDED of this attempt and the claim of `following` (the message's next) in one
    statement (`transitions.succeed_and_claim`), inside the attempt's `beating` block.

    Returns the outcome ("succeeded", "fenced", "unrecorded") and the next attempt's claim, None
    when that claim was not made (the database stayed away: the caller claims it on its own). None
    instead of both when the database refused the result: nothing was written, and the caller
    records this outcome (`record_outcome`) and claims the next attempt each on its own.
    """
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    next_id, next_attempt = following
    # Names the claim, so that the statement sent again after a lost reply finds the claim it made.
    token = uuid.uuid4()

    def write(conn: Connection) -> tuple[bool, transitions.Claimed | None]:
        return transitions.succeed_and_claim(
            conn, task_id=task_id, attempt=attempt, result=result,
            next_id=next_id, next_attempt=next_attempt, worker=worker, token=token,
        )  # fmt: skip

    with heartbeats.recording(task_id, attempt):
        try:
            done, claimed = persistently(
                database,
                write,
                within_sec=settings.worker_db_retry_sec,
                what="record the success and claim the next attempt",
                fields=fields,
            )
        except GaveUp as exc:
            return _gave_up(exc, "SUCCEEDED", fields), None
        except SQLAlchemyError as exc:
            log.info("success and next claim refused together (%s); writing them apart", describe(exc), extra=fields)
            return None
    return _logged(done, "STARTED -> SUCCEEDED", "succeeded", fields), NextClaim(claimed)


def _record_success(
    database: Database, task_id: uuid.UUID, attempt: int, result: Any, *, fields: dict[str, Any], settings: Settings
) -> str:
    """STARTED -> SUCCEEDED with `result`. Raises the database's error when it refuses the result."""
    try:
        done = persistently(
            database,
            lambda conn: transitions.succeed(conn, task_id=task_id, attempt=attempt, result=result),
            within_sec=settings.worker_db_retry_sec,
            what="record the success",
            fields=fields,
        )
    except GaveUp as exc:
        return _gave_up(exc, "SUCCEEDED", fields)
    return _logged(done, "STARTED -> SUCCEEDED", "succeeded", fields)


def record_failure(
    database: Database,
    task_id: uuid.UUID,
    attempt: int,
    *,
    error: str,
    outcome: RetryAfter | DeadWith,
    settings: Settings,
) -> str:
    """A failed attempt: FAILED with a backoff or DEAD with a DLQ message, as `outcome` says.

    The error text is stored escaped and clipped (`storable_error`). Should the database refuse it
    all the same, the failure is recorded with a generic text instead; should the database stay
    unreachable, it is logged and left to the stuck sweep ("unrecorded").
    """
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    error = transitions.storable_error(error) or ""
    within_sec = settings.worker_db_retry_sec
    try:
        try:
            return _write_failure(database, task_id, attempt, outcome, error, within_sec=within_sec, fields=fields)
        except SQLAlchemyError as exc:  # the error text refused despite storable_error: keep the failure
            refused = describe(exc)
        log.warning(
            "error text refused by the database (%s); recording the failure without it",
            refused,
            extra={**fields, "event": "error_refused"},
        )
        error = f"the attempt failed, but its error text could not be stored ({refused})"
        return _write_failure(database, task_id, attempt, outcome, error, within_sec=within_sec, fields=fields)
    except GaveUp as exc:
        return _gave_up(exc, "failure", fields)


def _write_failure(
    database: Database,
    task_id: uuid.UUID,
    attempt: int,
    outcome: RetryAfter | DeadWith,
    error: str,
    *,
    within_sec: float,
    fields: dict[str, Any],
) -> str:
    if isinstance(outcome, RetryAfter):
        done = persistently(
            database,
            lambda conn: transitions.fail(
                conn, task_id=task_id, attempt=attempt, error=error, retry_in_sec=outcome.delay_sec
            ),
            within_sec=within_sec,
            what="record the failure",
            fields=fields,
        )
        return _logged(done, f"STARTED -> FAILED, retry in {outcome.delay_sec:.2f}s", "failed", fields)
    name = persistently(
        database,
        lambda conn: transitions.kill(conn, task_id=task_id, attempt=attempt, error=error, reason=outcome.reason),
        within_sec=within_sec,
        what="record the failure",
        fields=fields,
    )
    if name is not None:
        try:
            publish_dead([DeadMessage(task_id=task_id, attempt=attempt, name=name, reason=outcome.reason, error=error)])
        except Exception as exc:  # the broker may be away; the DLQ sweep publishes DEAD tasks it has no row for
            log.warning("could not publish the DLQ message: %s", exc, extra={**fields, "event": "dlq_unpublished"})
    return _logged(name is not None, f"STARTED -> DEAD ({outcome.reason})", "dead", fields)


def _logged(done: bool, message: str, outcome: str, fields: dict[str, Any]) -> str:
    if done:
        log.info(message, extra={**fields, "event": outcome})
        return outcome
    log.warning("outcome discarded: attempt no longer STARTED (fenced)", extra={**fields, "event": "fenced"})
    return "fenced"


def _gave_up(exc: GaveUp, outcome: str, fields: dict[str, Any]) -> str:
    log.error(
        "outcome %s not recorded, the database was unreachable: %s; the task stays STARTED until the stuck"
        " sweep retries it",
        outcome,
        exc,
        extra={**fields, "event": "unrecorded"},
    )
    return "unrecorded"
