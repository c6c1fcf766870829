"""Dependencies shared by the routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy import Connection, text

from taskscheduler.config import Settings, get_settings
from taskscheduler.store import db

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_conn(settings: SettingsDep) -> Iterator[Connection]:
    with db.transaction(settings.database_url or None) as conn:
        yield conn


# scope="function": the transaction commits when the route returns, before the response is sent. (With
# FastAPI's default, "request", it would commit after: a client could be told 201 for a task whose
# commit then failed, and could read the state from before its own write.)
ConnDep = Annotated[Connection, Depends(get_conn, scope="function")]


def get_locking_conn(settings: SettingsDep) -> Iterator[Connection]:
    with db.transaction(settings.database_url or None) as conn:
        # A route that locks a task's row (cancel, retry) waits at most this long for another
        # transaction holding it; waiting indefinitely held a pooled connection and a worker thread
        # each, until neither was left for any route. The LockNotAvailable becomes a 503 (app.py).
        conn.execute(
            text("SELECT set_config('lock_timeout', :ms, true)"),
            {"ms": str(max(1, round(settings.api_lock_timeout_sec * 1000)))},
        )
        yield conn


LockingConnDep = Annotated[Connection, Depends(get_locking_conn, scope="function")]
