"""The database of one process: `Database`, built from a URL or the settings and handed to what needs it.

The API, the scheduler, each of the worker's pool processes and the process heartbeat get their
`Database` from whoever starts them (only `database_for`, for tests and one-off commands, reads
DATABASE_URL from the settings itself). Its connections
(SQLAlchemy engines for the sync paths, psycopg's async pool for the API's event loop) are made on
first use, in the process that uses them: a Celery pool process builds its own after the fork, since
a pooled connection must never be shared across one.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg.rows import tuple_row
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from taskscheduler.config import Settings, get_settings, normalize_database_url
from taskscheduler.store import statement_pool
from taskscheduler.store.statement_pool import AsyncConn, AsyncStatementPool

log = logging.getLogger(__name__)

T = TypeVar("T")

PING = "SELECT 1"
CLOCK = "SELECT now()"


def libpq_url(url: str) -> str:
    """A DATABASE_URL (any accepted scheme) as libpq reads it, for psycopg without SQLAlchemy."""
    return "postgresql://" + normalize_database_url(url).split("://", 1)[1]


class Database:
    """One process's connections to one database, made on first use."""

    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20, pool_timeout_sec: float = 5.0) -> None:
        self.url = normalize_database_url(url)
        self.libpq_url = libpq_url(url)
        self.pool_size = pool_size
        self.max_overflow = max_overflow
        self.pool_timeout_sec = pool_timeout_sec
        # Keyed by autocommit: the engine of transactions (False) and that of `run_statement` (True).
        self._engines: dict[bool, Engine] = {}
        self.statement_pool: AsyncStatementPool | None = None
        self._pid = os.getpid()

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """DATABASE_URL and the DB_POOL_* sizes of `settings`."""
        return cls(
            settings.require_urls()[0],
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout_sec=settings.db_pool_timeout_sec,
        )

    def __repr__(self) -> str:
        return f"Database({self.describe_server()})"

    def describe_server(self) -> str:
        """`host:port` (or the socket directory) of the database, for messages: never the password."""
        parsed = make_url(self.url)
        socket_dir = parsed.query.get("host")
        host = parsed.host or (socket_dir if isinstance(socket_dir, str) else None) or "localhost"
        return host if host.startswith("/") else f"{host}:{parsed.port or 5432}"

    # --- sync: SQLAlchemy engines ------------------------------------------------------------------------------

    def _create_engine(self, *, autocommit: bool) -> Engine:
        engine = create_engine(
            self.url,
            # run_statement retries a stale connection itself; elsewhere a ping per checkout is
            # worth its round trip.
            pool_pre_ping=not autocommit,
            pool_size=self.pool_size,
            max_overflow=self.max_overflow,
            # SQLAlchemy's default, 30 s, kept an API request (and its worker thread) waiting that
            # long when every connection was busy; the API answers its TimeoutError with a 503.
            pool_timeout=self.pool_timeout_sec,
            pool_recycle=1800,
            connect_args={"connect_timeout": 5, "application_name": "taskscheduler"},
            # Bound values (a task's payload or result, an error text) stay out of exception
            # messages, and so out of every log that prints one.
            hide_parameters=True,
            **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
        )
        # A Database dropped without dispose() (a test's app that never ran its lifespan) closes
        # its connections when it is collected, rather than leaving them to the garbage collector.
        weakref.finalize(self, _dispose, engine, self._pid)
        return engine

    def _forked(self) -> None:
        """After a fork, forget the parent's connections (without closing them: they are the
        parent's) so that this process opens its own."""
        if self._pid == os.getpid():
            return
        for engine in self._engines.values():
            engine.dispose(close=False)
        self._engines = {}
        self.statement_pool = None
        self._pid = os.getpid()

    def _engine(self, *, autocommit: bool) -> Engine:
        self._forked()
        engine = self._engines.get(autocommit)
        if engine is None:
            engine = self._engines[autocommit] = self._create_engine(autocommit=autocommit)
        return engine

    @property
    def engine(self) -> Engine:
        return self._engine(autocommit=False)

    @property
    def autocommit_engine(self) -> Engine:
        """The engine of `run_statement`: each statement commits on its own."""
        return self._engine(autocommit=True)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in a transaction: committed on exit, rolled back on error."""
        with self.engine.begin() as conn:
            yield conn

    def run_statement(self, statement: Callable[[Connection], T]) -> T:
        """Run `statement`, a single guarded SQL statement, in autocommit mode: one round trip.

        Every transition is one statement, atomic on its own, so BEGIN/COMMIT and a ping per checkout
        would only add round trips on the workers' hot path. A connection found dead (the server
        restarted) invalidates the pool and the statement runs once more on a fresh one: repeating a
        guarded statement is safe, since a second run matches no row.
        """
        try:
            with self.autocommit_engine.connect() as conn:
                return statement(conn)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        with self.autocommit_engine.connect() as conn:
            return statement(conn)

    def ping(self) -> None:
        """Raise unless the database answers a statement."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql(PING)

    def now(self) -> datetime:
        """The database's clock."""
        with self.engine.connect() as conn:
            value: datetime = conn.exec_driver_sql(CLOCK).scalar_one()
        return value

    def wait_until_up(self, *, timeout_sec: float = 60.0, log_every_sec: float = 10.0) -> None:
        """Block until the database answers, or raise RuntimeError after `timeout_sec` with the last
        error's first line. The reason it does not answer is logged at most every `log_every_sec`."""
        deadline = time.monotonic() + timeout_sec
        delay = 0.2
        next_log = time.monotonic()
        while True:
            try:
                self.ping()
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

    def dispose(self) -> None:
        """Close the engines' connections (the statement pool is closed by `close_statement_pool`)."""
        self._forked()
        while self._engines:
            self._engines.popitem()[1].dispose()

    # --- async: the event loop's statement pool ----------------------------------------------------------------

    async def open_statement_pool(self, *, size: int | None = None, wait: bool = False) -> AsyncStatementPool:
        """Open the pool that `run_statement_async` and `run_transaction_async` use, on the running
        event loop (`size` default: DB_POOL_SIZE). Without `wait` it returns at once, whether the
        database is up or not: the API starts while the database is down, and answers 503 until it is up."""
        pool = statement_pool.statement_pool(self.libpq_url, size=size or self.pool_size)
        await pool.open(wait=wait)
        self.statement_pool = pool
        return pool

    async def close_statement_pool(self) -> None:
        pool, self.statement_pool = self.statement_pool, None
        if pool is not None:
            await pool.close()

    async def run_statement_async(self, statement: Callable[[AsyncConn], Awaitable[T]]) -> T:
        """`run_statement` for the event loop: `statement(conn)`, a coroutine safe to repeat, on an
        autocommit connection of the statement pool (of its own while no pool is open)."""
        return await statement_pool.run_statement_async(self.statement_pool, self.libpq_url, statement)

    async def run_transaction_async(self, work: Callable[[AsyncConn], Awaitable[T]]) -> T:
        """`work(conn)` in a transaction on the event loop (see `statement_pool.run_transaction_async`)."""
        return await statement_pool.run_transaction_async(self.statement_pool, self.libpq_url, work)


def fetch_row(conn: Connection, statement: str, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """`conn.exec_driver_sql(statement, params).first()` as a plain tuple, run on the driver's
    connection underneath `conn` (`statement` must return rows): for the worker's per-task
    statements, where SQLAlchemy's execution context and Result cost more client CPU than psycopg's
    own execute (measured: about a third of the pool process's own work per task, BENCHMARKS.md).
    Same connection, same transaction, same prepared statements.

    Errors come out as from `exec_driver_sql`: SQLAlchemy's exception classes (which `is_transient`
    and `persistently` read), parameters hidden, and a connection found dead invalidated, so that
    `Database.run_statement` retries on a fresh one.
    """
    if not conn.in_transaction():
        conn.begin()  # as SQLAlchemy's autobegin would: the caller's commit() then commits this work
    proxied = conn.connection
    driver = proxied.driver_connection
    assert driver is not None, "a checked-out connection has its driver connection"
    try:
        with driver.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(statement, params)
            # Every statement read this way returns rows; `description` (built per call) is not asked for.
            row: tuple[Any, ...] | None = cursor.fetchone()
            return row
    except psycopg.Error as exc:
        dbapi_error: Any = exc  # psycopg's errors are the DBAPI's, which SQLAlchemy's stubs name apart
        invalidated = conn.dialect.is_disconnect(dbapi_error, proxied.dbapi_connection, None)
        if invalidated:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            statement,
            params,
            exc,
            psycopg.Error,
            hide_parameters=True,
            connection_invalidated=invalidated,
            dialect=conn.dialect,
        ) from exc


def _dispose(engine: Engine, pid: int) -> None:
    engine.dispose(close=os.getpid() == pid)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says the database was unreachable or busy (a failover, a restart, a lost
    connection, a full pool, a serialization failure) rather than that it refused the statement:
    the same statement may then succeed later."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | PoolTimeout)


# The errors `unavailable` speaks of, from both paths: SQLAlchemy's, and psycopg's own (its pool's
# PoolTimeout, no connection back in time, is an OperationalError too).
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (DBAPIError, PoolTimeout, psycopg.OperationalError)


def unavailable(exc: BaseException) -> str | None:
    """Why the database could not serve a request now, in words for a client that may try again;
    None when `exc` is not such an error (a statement the database refused, a bug)."""
    if isinstance(exc, PoolTimeout):  # every connection of the engine's pool stayed taken
        return "all database connections are busy, try again"
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, psycopg.errors.LockNotAvailable):  # lock_timeout: another transaction holds the row
        return "the task is being changed by another transaction, try again"
    invalidated = isinstance(exc, DBAPIError) and exc.connection_invalidated
    if invalidated or isinstance(exc, OperationalError | psycopg.OperationalError):
        return "database unavailable, try again"
    return None


# --- for tests and one-off commands -----------------------------------------------------------------------------

_shared: dict[str, Database] = {}


def database_for(url: str | None = None) -> Database:
    """A Database for `url` (default: DATABASE_URL of the settings), shared within this process: for
    tests, scripts and commands that run a statement or two. A server process builds its own."""
    url = normalize_database_url(url) if url else get_settings().require_urls()[0]
    if url not in _shared:
        _shared[url] = Database(url)
    return _shared[url]


@contextmanager
def transaction(url: str | None = None) -> Iterator[Connection]:
    """`database_for(url).transaction()`."""
    with database_for(url).transaction() as conn:
        yield conn


def dispose_engines() -> None:
    """Close the connections of the shared Databases."""
    while _shared:
        _shared.popitem()[1].dispose()
