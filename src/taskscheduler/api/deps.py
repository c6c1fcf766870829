"""Dependencies shared by the routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy import Connection

from taskscheduler.config import Settings, get_settings
from taskscheduler.store import db

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_conn(settings: SettingsDep) -> Iterator[Connection]:
    with db.transaction(settings.database_url or None) as conn:
        yield conn


ConnDep = Annotated[Connection, Depends(get_conn)]
