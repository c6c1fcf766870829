"""The worker's writes, tried again while the database is away (WORKER_DB_RETRY_SEC)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from taskscheduler.store import db
from taskscheduler.store.db import Database

log = logging.getLogger(__name__)

T = TypeVar("T")

# The pause between two tries of a write while the database is away doubles up to this cap: short,
# so that once it is back the outcome lands within about a heartbeat, before the stuck sweep (which
# sees heartbeats as old as the outage) could take the attempt away.
_RETRY_PAUSE_MAX_SEC = 2.0


class GaveUp(Exception):
    """The database stayed unreachable for WORKER_DB_RETRY_SEC: the write was not made (or its
    reply never came back)."""


def persistently(
    database: Database, statement: Callable[[Connection], T], *, within_sec: float, what: str, fields: dict[str, Any]
) -> T:
    """`database.run_statement(statement)`, tried again after a transient failure (the database
    unreachable, restarting or failing over) with a capped, jittered doubling pause, for up to
    `within_sec`; then GaveUp. Safe because every statement here is a compare-and-set: a try whose
    reply was lost after it committed makes the next try match no row (or, for a claim, find its own).
    Errors that are not transient (a value refused, a bug) are raised at once."""
    deadline = time.monotonic() + within_sec
    pause = 0.2
    tries = 0
    while True:
        tries += 1
        try:
            return database.run_statement(statement)
        except SQLAlchemyError as exc:
            if not db.is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise GaveUp(f"{describe(exc)} for {within_sec:g}s ({tries} tries)") from exc
            if tries == 1:
                log.warning(
                    "could not %s (%s); retrying for up to %gs",
                    what,
                    describe(exc),
                    within_sec,
                    extra={**fields, "event": "db_retry"},
                )
            time.sleep(min(left, random.uniform(pause / 2, pause)))
            pause = min(pause * 2, _RETRY_PAUSE_MAX_SEC)


def describe(exc: BaseException) -> str:
    """A database error in a few words, without its message: PostgreSQL's message may quote the
    value it refused (a result, an error text), which must not reach the logs or the task."""
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None)
    return f"{type(orig).__name__}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")
