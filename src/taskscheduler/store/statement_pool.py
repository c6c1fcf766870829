"""Connections for the event loop: psycopg's async pool, on which the API's hot routes run their statements.

A route on SQLAlchemy's sync engine pays a thread-pool hop and SQLAlchemy's own work per statement;
on the loop a statement costs one round trip and little else. `Database` owns one such pool (see
`Database.open_statement_pool`); these are the pieces it is made of.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
import pydantic_core
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

T = TypeVar("T")

AsyncConn = psycopg.AsyncConnection[DictRow]
AsyncStatementPool = AsyncConnectionPool[AsyncConn]

# How long a request waits for a pooled connection before its 503. The pool is busy for far less
# than this (even a batch of 1,000 tasks is a fraction of it); a wait this long means the database
# is down (no connection comes back) and the client is better told so soon.
CONNECTION_WAIT_SEC = 2.0
# How long the pool retries to reopen a connection with its doubling backoff before it gives that
# slot up; a request then reopens one on demand. Short, so that after a long outage the API is back
# within seconds of the database, not after a backoff delay grown to minutes.
RECONNECT_GIVE_UP_SEC = 5.0

# Set up as the engines' connections are.
_CONNECT_KWARGS: dict[str, Any] = {
    "autocommit": True,
    "row_factory": dict_row,
    "connect_timeout": 5,
    "application_name": "taskscheduler",
}


async def connect_async(libpq_url: str) -> AsyncConn:
    """An autocommit psycopg connection for the event loop, of its own (no pool)."""
    conn: AsyncConn = await psycopg.AsyncConnection.connect(libpq_url, **_CONNECT_KWARGS)
    return conn


def _json_loads(data: bytes | str) -> Any:
    try:
        return pydantic_core.from_json(data)
    except ValueError:  # nesting beyond its recursion limit, which json.loads goes past
        return json.loads(data)


async def _configure(conn: AsyncConn) -> None:
    # These connections write and read task payloads on the event loop, where every millisecond
    # spent is one nothing else is answered in; pydantic-core's JSON is several times faster than
    # the json module's, and reads back the same values.
    set_json_dumps(pydantic_core.to_json, conn)
    set_json_loads(_json_loads, conn)


def statement_pool(libpq_url: str, *, size: int) -> AsyncStatementPool:
    """Autocommit connections for the statements run on the event loop, created closed.

    A fixed `size`: closing the connections above a smaller idle size and reopening them under load
    cost a large part of the API's time (benchmarks/api.py); requests beyond `size` wait for a connection
    instead, which one event loop with statements of well under a millisecond hardly notices. No
    check per checkout (a round trip each): `run_statement_async` and `run_transaction_async` retry
    on a dead one.
    """
    return AsyncConnectionPool(
        libpq_url,
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
    call through the connection's lock that an autocommit connection does not need."""
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
    pool: AsyncStatementPool | None, libpq_url: str, statement: Callable[[AsyncConn], Awaitable[T]]
) -> T:
    """`statement(conn)` (a coroutine) on an autocommit connection from `pool`, or on a connection of
    its own without one (a test client without a lifespan). A connection found dead is replaced and
    the statement run once more, so `statement` must be safe to repeat."""
    if pool is None:
        async with await connect_async(libpq_url) as conn:
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
    pool: AsyncStatementPool | None, libpq_url: str, work: Callable[[AsyncConn], Awaitable[T]]
) -> T:
    """`work(conn)` in a transaction on a connection of `pool` (or one of its own without a pool):
    committed when it returns, rolled back when it raises. A connection found dead before the
    COMMIT was sent is replaced and the transaction run once more: nothing of it can have committed.
    A failure of the COMMIT itself is raised, since the transaction may have committed."""
    if pool is None:
        async with await connect_async(libpq_url) as conn, conn.transaction():
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
