"""Engines and connections. One engine per process and URL, created after any fork."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from taskscheduler.config import get_settings, normalize_database_url

log = logging.getLogger(__name__)

T = TypeVar("T")

_engines: dict[tuple[int, str, bool], Engine] = {}


def get_engine(url: str | None = None, *, autocommit: bool = False) -> Engine:
    """The process's engine for `url` (default: DATABASE_URL).

    Keyed by pid because a pooled connection must never be shared across a fork (Celery's prefork
    children inherit the parent's memory). The autocommit engine serves `run_statement`.
    """
    url = normalize_database_url(url) if url else get_settings().require_urls()[0]
    key = (os.getpid(), url, autocommit)
    engine = _engines.get(key)
    if engine is None:
        engine = create_engine(
            url,
            # run_statement retries a stale connection itself; elsewhere a ping per checkout is
            # worth its round trip.
            pool_pre_ping=not autocommit,
            pool_size=10,
            max_overflow=20,
            pool_recycle=1800,
            connect_args={"connect_timeout": 5, "application_name": "taskscheduler"},
            **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
        )
        _engines[key] = engine
    return engine


def run_statement(statement: Callable[[Connection], T], url: str | None = None) -> T:
    """Run `statement`, a single guarded SQL statement, in autocommit mode: one round trip.

    Every transition is one statement, atomic on its own, so BEGIN/COMMIT and a ping per checkout
    would only add round trips on the workers' hot path. A connection found dead (the server
    restarted) invalidates the pool and the statement runs once more on a fresh one: repeating a
    guarded statement is safe, since a second run matches no row.
    """
    engine = get_engine(url, autocommit=True)
    try:
        with engine.connect() as conn:
            return statement(conn)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with engine.connect() as conn:
        return statement(conn)


def dispose_engines() -> None:
    for key in [k for k in _engines if k[0] == os.getpid()]:
        _engines.pop(key).dispose()


@contextmanager
def transaction(url: str | None = None) -> Iterator[Connection]:
    """A connection in a transaction: committed on exit, rolled back on error."""
    with get_engine(url).begin() as conn:
        yield conn


def wait_for_database(url: str | None = None, *, timeout_sec: float = 60.0) -> None:
    """Block until the database answers, or raise after `timeout_sec`."""
    deadline = time.monotonic() + timeout_sec
    delay = 0.2
    while True:
        try:
            with get_engine(url).connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except OperationalError as exc:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"database not reachable after {timeout_sec:.0f}s: {exc.orig}") from exc
            log.info("waiting for the database: %s", str(exc.orig).strip().splitlines()[0])
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
