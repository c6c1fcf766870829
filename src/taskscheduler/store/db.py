"""Engines and connections. One engine per process and URL, created after any fork."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import psycopg
import pydantic_core
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from taskscheduler.config import get_settings, normalize_database_url

log = logging.getLogger(__name__)

T = TypeVar("T")

_engines: dict[tuple[int, str, bool], Engine] = {}


def get_engine(url: str | None = None, *, autocommit: bool = False) -> Engine:
    """The process's engine for `url` (default: DATABASE_URL).

    Keyed by pid because a pooled connection must never be shared across a fork (Celery's prefork
    children inherit the parent's memory). The autocommit engine serves `run_statement`.
    """
    settings = get_settings()
    url = normalize_database_url(url) if url else settings.require_urls()[0]
    key = (os.getpid(), url, autocommit)
    engine = _engines.get(key)
    if engine is None:
        engine = create_engine(
            url,
            # run_statement retries a stale connection itself; elsewhere a ping per checkout is
            # worth its round trip.
            pool_pre_ping=not autocommit,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            # SQLAlchemy's default, 30 s, kept an API request (and its worker thread) waiting that
            # long when every connection was busy; the API answers its TimeoutError with a 503.
            pool_timeout=settings.db_pool_timeout_sec,
            pool_recycle=1800,
            connect_args={"connect_timeout": 5, "application_name": "taskscheduler"},
            # Bound values (a task's payload or result, an error text) stay out of exception
            # messages, and so out of every log that prints one.
            hide_parameters=True,
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


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says the database was unreachable or busy (a failover, a restart, a lost
    connection, a full pool, a serialization failure) rather than that it refused the statement:
    the same statement may then succeed later."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | PoolTimeout)


def dispose_engines() -> None:
    for key in [k for k in _engines if k[0] == os.getpid()]:
        _engines.pop(key).dispose()


@contextmanager
def transaction(url: str | None = None) -> Iterator[Connection]:
    """A connection in a transaction: committed on exit, rolled back on error."""
    with get_engine(url).begin() as conn:
        yield conn


def wait_for_database(url: str | None = None, *, timeout_sec: float = 60.0, log_every_sec: float = 10.0) -> None:
    """Block until the database answers, or raise after `timeout_sec` with the last error's first line.

    The reason it does not answer is logged at most every `log_every_sec`, not at every try."""
    deadline = time.monotonic() + timeout_sec
    delay = 0.2
    next_log = time.monotonic()
    while True:
        try:
            with get_engine(url).connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
            now = time.monotonic()
            if now >= deadline:
                raise RuntimeError(reason) from exc
            if now >= next_log:
                log.info("waiting for the database: %s", reason)
                next_log = now + log_every_sec
            time.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, 2.0)


def describe_server(url: str | None = None) -> str:
    """`host:port` (or the socket directory) of DATABASE_URL, for messages: never the password."""
    from sqlalchemy.engine import make_url

    parsed = make_url(normalize_database_url(url) if url else get_settings().require_urls()[0])
    socket_dir = parsed.query.get("host")
    host = parsed.host or (socket_dir if isinstance(socket_dir, str) else None) or "localhost"
    return host if host.startswith("/") else f"{host}:{parsed.port or 5432}"


AsyncConn = psycopg.AsyncConnection[DictRow]


def libpq_url(url: str | None = None) -> str:
    """DATABASE_URL (default: the setting) as libpq reads it, for psycopg without SQLAlchemy."""
    url = normalize_database_url(url) if url else get_settings().require_urls()[0]
    return "postgresql://" + url.split("://", 1)[1]


# Connections for the event loop, set up as the engines' connections are.
_CONNECT_KWARGS: dict[str, Any] = {
    "autocommit": True,
    "row_factory": dict_row,
    "connect_timeout": 5,
    "application_name": "taskscheduler",
}


async def connect_async(url: str | None = None) -> AsyncConn:
    """An autocommit psycopg connection for the event loop, of its own (no pool)."""
    conn: AsyncConn = await psycopg.AsyncConnection.connect(libpq_url(url), **_CONNECT_KWARGS)
    return conn


# What the API's routes run their statements on (see `statement_pool`).
AsyncStatementPool = AsyncConnectionPool[AsyncConn]

# How long a request waits for a pooled connection before its 503. The pool is busy for well under
# this (a statement takes under a millisecond, a batch of 1,000 tasks ~50 ms); a wait this long
# means the database is down (no connection comes back) and the client is better told so soon.
CONNECTION_WAIT_SEC = 2.0
# How long the pool retries to reopen a connection with its doubling backoff before it gives that
# slot up; a request then reopens one on demand. Short, so that after a long outage the API is back
# within seconds of the database, not after a backoff delay grown to minutes.
RECONNECT_GIVE_UP_SEC = 5.0


def _json_loads(data: bytes | str) -> Any:
    try:
        return pydantic_core.from_json(data)
    except ValueError:  # nesting beyond its recursion limit, which json.loads goes past
        return json.loads(data)


async def _configure(conn: AsyncConn) -> None:
    # These connections write and read task payloads on the event loop, where every millisecond
    # spent is one nothing else is answered in; pydantic-core's JSON is ~4x faster than the json
    # module's (a 256 KiB payload: ~5 ms instead of ~20 each way), and reads back the same values.
    set_json_dumps(pydantic_core.to_json, conn)
    set_json_loads(_json_loads, conn)


def statement_pool(url: str | None = None, *, size: int = 10) -> AsyncStatementPool:
    """Autocommit connections for the statements the API runs on its event loop (its hot routes).

    A route on SQLAlchemy's sync engine pays a thread-pool hop and SQLAlchemy's own work per
    statement; on the loop a statement costs one round trip and little else. A fixed `size`:
    closing the connections above a smaller idle size and reopening them under load cost a tenth
    of the API's time (measured); requests beyond `size` wait for a connection instead, which one
    event loop with statements of well under a millisecond hardly notices. No check per checkout
    (a round trip each): `run_statement_async` and `run_transaction_async` retry on a dead one.
    Created closed: `await pool.open()` on the event loop that will use it (it does not wait for
    the database), `await pool.close()` when that loop's work is done.
    """
    return AsyncConnectionPool(
        libpq_url(url),
        connection_class=AsyncConn,
        kwargs=_CONNECT_KWARGS,
        configure=_configure,
        min_size=size,
        max_size=size,
        open=False,
        name="taskscheduler-statements",
        timeout=CONNECTION_WAIT_SEC,
        max_lifetime=1800,
        reconnect_timeout=RECONNECT_GIVE_UP_SEC,
    )


@asynccontextmanager
async def _pooled(pool: AsyncStatementPool) -> AsyncIterator[AsyncConn]:
    """A connection of `pool`, given back afterwards (discarded and replaced if it died).
    getconn/putconn rather than `pool.connection()`, which also commits or rolls back on exit: a
    call through the connection's lock that an autocommit connection does not need (measured:
    ~6 of the ~12 us the pool costs per statement)."""
    conn = await pool.getconn()
    try:
        yield conn
    finally:
        await pool.putconn(conn)


@asynccontextmanager
async def _answering_connection(pool: AsyncStatementPool) -> AsyncIterator[AsyncConn]:
    """A connection of `pool` that answers a ping. Used after a connection was found dead: those
    that sat idle beside it are likely dead too (the server restarted). A dead one goes back to the
    pool, which discards and reopens it; `max_size` + 1 tries reach past every idle one to a new one."""
    error: psycopg.OperationalError | None = None
    for _ in range(pool.max_size + 1):
        async with _pooled(pool) as conn:
            try:
                await pool.check_connection(conn)
            except psycopg.OperationalError as exc:
                error = exc
                continue
            yield conn
            return
    assert error is not None
    raise error


async def run_statement_async(
    pool: AsyncStatementPool | None, statement: Callable[[AsyncConn], Awaitable[T]], url: str | None = None
) -> T:
    """`run_statement` for the event loop: `statement(conn)` (a coroutine) on an autocommit connection
    from `pool`, or on a connection of its own without one (a test client without a lifespan). A
    connection found dead is replaced and the statement run once more, so `statement` must be safe
    to repeat."""
    if pool is None:
        async with await connect_async(url) as conn:
            return await statement(conn)
    async with _pooled(pool) as conn:
        try:
            return await statement(conn)
        except psycopg.OperationalError:
            if not conn.broken:
                raise
    async with _answering_connection(pool) as conn:
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
    async with _pooled(pool) as conn:
        committing = False
        try:
            async with conn.transaction():
                result = await work(conn)
                committing = True
            return result
        except psycopg.OperationalError:
            if committing or not conn.broken:
                raise
    async with _answering_connection(pool) as conn, conn.transaction():
        return await work(conn)
