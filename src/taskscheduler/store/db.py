"""Engines and connections. One engine per process and URL, created after any fork."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

import psycopg
from psycopg import pq
from psycopg.rows import DictRow, dict_row
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


AsyncConn = psycopg.AsyncConnection[DictRow]


def libpq_url(url: str | None = None) -> str:
    """DATABASE_URL (default: the setting) as libpq reads it, for psycopg without SQLAlchemy."""
    url = normalize_database_url(url) if url else get_settings().require_urls()[0]
    return "postgresql://" + url.split("://", 1)[1]


async def connect_async(url: str | None = None) -> AsyncConn:
    """An autocommit psycopg connection for the event loop, set up as the engines' connections are."""
    return await psycopg.AsyncConnection.connect(
        libpq_url(url), autocommit=True, row_factory=dict_row, connect_timeout=5, application_name="taskscheduler"
    )


class AsyncStatementPool:
    """Autocommit connections for single statements run from an event loop (the API's hot routes).

    A route on SQLAlchemy's sync engine pays a thread-pool hop and SQLAlchemy's own work per
    statement; on the loop a statement costs one round trip and little else. The pool is this
    small on purpose: no pre-ping (a caller retries a statement that met a dead connection, see
    `connection(fresh=...)`), no background tasks, and a new connection is opened on demand, so a
    database that is down is an immediate error, not a wait. At most `max_size` connections, all
    kept open once opened: closing the ones above a smaller idle size, as a pool with overflow
    does, reopens connections all the time under a steady load of more concurrent requests than
    that (measured: a tenth of the API's time); the requests beyond `max_size` wait for a
    connection instead, which one event loop with a statement of well under a millisecond hardly
    notices. It belongs to the event loop it was created on; `close()` it when that loop's work is
    done.
    """

    def __init__(self, url: str | None = None, *, max_size: int = 10, max_age_sec: float = 1800):
        self.url = url
        self.max_age_sec = max_age_sec
        self._idle: list[tuple[AsyncConn, float]] = []
        self._slots = asyncio.Semaphore(max_size)
        self._closed = False

    @asynccontextmanager
    async def connection(self, *, fresh: bool = False) -> AsyncIterator[AsyncConn]:
        """A connection, given back afterwards. `fresh`: not one that sat idle (after one was found
        dead, the others are likely dead too: the server restarted)."""
        async with self._slots:
            if fresh:
                await self._discard_idle()
            if self._idle:
                conn, opened = self._idle.pop()
            else:
                conn, opened = await connect_async(self.url), time.monotonic()
            try:
                yield conn
            finally:
                await self._give_back(conn, opened)

    async def _give_back(self, conn: AsyncConn, opened: float) -> None:
        reusable = (
            not self._closed
            and not conn.closed
            and conn.info.transaction_status == pq.TransactionStatus.IDLE
            and time.monotonic() - opened < self.max_age_sec
        )
        if reusable:
            self._idle.append((conn, opened))
            return
        if conn.broken:
            await self._discard_idle()
        await conn.close()

    async def _discard_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            await conn.close()

    async def close(self) -> None:
        self._closed = True
        await self._discard_idle()


async def run_statement_async(
    pool: AsyncStatementPool | None, statement: Callable[[AsyncConn], Awaitable[T]], url: str | None = None
) -> T:
    """`run_statement` for the event loop: `statement(conn)` (a coroutine) on an autocommit connection
    from `pool`, or on a connection of its own without one. A connection found dead is replaced and
    the statement run once more, so `statement` must be safe to repeat."""
    if pool is None:
        async with await connect_async(url) as conn:
            return await statement(conn)
    async with pool.connection() as conn:
        try:
            return await statement(conn)
        except psycopg.OperationalError:
            if not conn.broken:
                raise
    async with pool.connection(fresh=True) as conn:
        return await statement(conn)


async def run_transaction_async(
    pool: AsyncStatementPool | None, work: Callable[[AsyncConn], Awaitable[T]], url: str | None = None
) -> T:
    """`work(conn)` in a transaction on a connection of `pool` (or one of its own without a pool):
    committed when it returns, rolled back when it raises. A connection found dead before the
    COMMIT was sent is replaced and the transaction run once more: nothing of it can have committed.
    A failure of the COMMIT itself is raised, since the transaction may have committed."""
    if pool is None:
        async with await connect_async(url) as conn, conn.transaction():
            return await work(conn)
    async with pool.connection() as conn:
        committing = False
        try:
            async with conn.transaction():
                result = await work(conn)
                committing = True
            return result
        except psycopg.OperationalError:
            if committing or not conn.broken:
                raise
    async with pool.connection(fresh=True) as conn, conn.transaction():
        return await work(conn)
