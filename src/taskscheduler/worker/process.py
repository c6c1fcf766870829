"""The Database of a worker process, built as the process starts: in the main process (Celery's
`worker_init`, where the boot step beats on it) and in each pool process after its fork
(`worker_process_init`), so that no connection is shared across the fork."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init, worker_process_init

from taskscheduler.config import get_settings
from taskscheduler.store import db
from taskscheduler.store.db import Database

_database: Database | None = None


def database() -> Database:
    """This process's Database; outside a Celery worker (tests that run attempts in-process), the
    process's shared one for DATABASE_URL."""
    return _database if _database is not None else db.database_for()


def _start(**_: Any) -> None:
    global _database
    _database = Database.from_settings(get_settings())


worker_init.connect(_start, weak=False)
worker_process_init.connect(_start, weak=False)
