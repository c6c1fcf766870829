"""The store's statements on a connection the caller owns, in the caller's transaction.

`submit(..., connection=conn)` creates a task with the statements every other path runs
(`creation.CREATE_TASKS`, its NOTIFY included), on the application's own connection: the task is
committed or rolled back with the application's work. PostgreSQL delivers a NOTIFY sent in a
transaction when it commits, and drops it when it rolls back, so the scheduler wakes for the task
only once it can see it.

Taken: a SQLAlchemy `Connection` or `Session` (any PostgreSQL driver: the statements are run as
`text()` with `:name` parameters, which SQLAlchemy writes in the driver's own style), a psycopg
`Connection`, their async twins (`AsyncConnection`, `AsyncSession`, psycopg's `AsyncConnection`),
and any DB-API connection with `%(name)s` parameters (psycopg2, Django's `connection`).
JSON values go in as JSON text, which every driver passes on for PostgreSQL to read as jsonb.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from taskscheduler.store.creation import RunStatement, RunStatementAsync
from taskscheduler.store.sql import named_style


class UnsupportedConnection(TypeError):
    """Not a connection the task can be created on."""

    def __init__(self, connection: object) -> None:
        super().__init__(
            f"cannot submit on a {type(connection).__module__}.{type(connection).__qualname__}: pass a SQLAlchemy"
            " Connection or Session, a psycopg connection, their async twins, or a DB-API connection (psycopg2,"
            " Django's connection); use submit_async for an async one"
        )


def _row(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A task row as the store's own paths read it, from whatever the driver returned (asyncpg
    gives jsonb as text and its own UUID type)."""
    out = {str(k): v for k, v in row.items()}
    if isinstance(out.get("payload"), str):
        out["payload"] = json.loads(out["payload"])
    if out.get("id") is not None and not isinstance(out["id"], uuid.UUID):
        out["id"] = uuid.UUID(str(out["id"]))
    return out


def statement_runner(connection: Any) -> RunStatement:
    """How to run a statement on `connection`, a synchronous one; UnsupportedConnection otherwise."""
    import psycopg
    from psycopg.rows import dict_row
    from sqlalchemy import Connection, text
    from sqlalchemy.orm import Session

    if isinstance(connection, Session):
        connection = connection.connection()  # the session's transaction
    if isinstance(connection, Connection):
        conn = connection

        def run_sqlalchemy(statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            return [_row(row) for row in conn.execute(text(named_style(statement)), params).mappings()]

        return run_sqlalchemy
    if isinstance(connection, psycopg.Connection):
        pg = connection

        def run_psycopg(statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            with pg.cursor(row_factory=dict_row) as cursor:
                cursor.execute(statement, params)
                return [_row(row) for row in cursor.fetchall()]

        return run_psycopg
    if isinstance(connection, psycopg.AsyncConnection) or _is_async(connection):
        raise UnsupportedConnection(connection)
    if callable(getattr(connection, "cursor", None)):
        dbapi = connection

        def run_dbapi(statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            cursor = dbapi.cursor()
            try:
                cursor.execute(statement, params)
                names = [column[0] for column in cursor.description]
                return [_row(dict(zip(names, values, strict=True))) for values in cursor.fetchall()]
            finally:
                cursor.close()

        return run_dbapi
    raise UnsupportedConnection(connection)


def _is_async(connection: Any) -> bool:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    return isinstance(connection, AsyncConnection | AsyncSession)


def async_statement_runner(connection: Any) -> RunStatementAsync:
    """`statement_runner` for an async connection (SQLAlchemy's `AsyncConnection` or `AsyncSession`,
    psycopg's `AsyncConnection`)."""
    import psycopg
    from psycopg.rows import dict_row
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if isinstance(connection, AsyncSession):
        session = connection

        async def run_session(statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            conn = await session.connection()  # the session's transaction
            result = await conn.execute(text(named_style(statement)), params)
            return [_row(row) for row in result.mappings()]

        return run_session
    if isinstance(connection, AsyncConnection):
        async_conn = connection

        async def run_sqlalchemy(statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            result = await async_conn.execute(text(named_style(statement)), params)
            return [_row(row) for row in result.mappings()]

        return run_sqlalchemy
    if isinstance(connection, psycopg.AsyncConnection):
        pg = connection

        async def run_psycopg(statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            async with pg.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(statement, params)
                return [_row(row) for row in await cursor.fetchall()]

        return run_psycopg
    raise UnsupportedConnection(connection)
