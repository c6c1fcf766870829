"""What the routes share: the router they are declared on, and their dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.security import HTTPBearer
from sqlalchemy import Connection

from taskscheduler.api.body_guard import PreparsedJsonRoute
from taskscheduler.config import Settings, get_settings
from taskscheduler.store import operations
from taskscheduler.store.db import Database

# Declares the scheme in the OpenAPI document, so Swagger shows "Authorize"; ApiKeyAuth enforces it.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="One of the keys in API_KEYS, sent as `Authorization: Bearer <key>`. Needed only when the"
    " server sets API_KEYS.",
)
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    400: {"description": "API_KEYS is set and the request has several Authorization headers."},
    401: {"description": "API_KEYS is set and no valid key was sent."},
}


def protected_router(tag: str) -> APIRouter:
    """A router for routes (of the docs' section `tag`) that ask for an API key when API_KEYS is set
    (enforced by `api.auth.ApiKeyAuth` for every path but the public ones; declared here for the docs)."""
    return APIRouter(
        tags=[tag], dependencies=[Security(bearer)], responses=UNAUTHORIZED, route_class=PreparsedJsonRoute
    )


SettingsDep = Annotated[Settings, Depends(get_settings)]


# async: FastAPI would run a sync dependency in the thread pool, a hop per request.
async def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


DatabaseDep = Annotated[Database, Depends(get_database)]


def get_conn(database: DatabaseDep) -> Iterator[Connection]:
    with database.transaction() as conn:
        yield conn


# scope="function": the transaction commits when the route returns, before the response is sent. (With
# FastAPI's default, "request", it would commit after: a client could be told 201 for a task whose
# commit then failed, and could read the state from before its own write.)
ConnDep = Annotated[Connection, Depends(get_conn, scope="function")]


def get_locking_conn(database: DatabaseDep, settings: SettingsDep) -> Iterator[Connection]:
    with database.transaction() as conn:
        # A route that locks a task's row (cancel, retry) waits at most this long for another
        # transaction holding it; waiting indefinitely held a pooled connection and a worker thread
        # each, until neither was left for any route. The LockNotAvailable becomes a 503 (app.py).
        operations.limit_lock_wait(conn, settings.api_lock_timeout_sec)
        yield conn


LockingConnDep = Annotated[Connection, Depends(get_locking_conn, scope="function")]
