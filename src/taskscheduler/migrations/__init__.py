"""Alembic migrations; run with `taskscheduler migrate` (see `run_migrations`)."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

from taskscheduler.config import normalize_database_url

HERE = Path(__file__).parent


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    # Alembic's config is ConfigParser-based: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_database_url(database_url).replace("%", "%%"))
    return cfg


def run_migrations(database_url: str, revision: str = "head") -> None:
    """`alembic upgrade head`. Safe to run twice, and from several processes at once."""
    command.upgrade(alembic_config(database_url), revision)


def migrate_database(database_url: str, *, events_partition_sec: float, events_partitions_ahead: int) -> int:
    """What `taskscheduler migrate` (and `dev`) does: the migrations, then the range partitions of
    task_events from now on. Without them a fresh database's events land in the DEFAULT partition
    until the scheduler's first retention pass, and a period whose events sit there can never get a
    range partition of its own. Returns how many partitions were created."""
    from taskscheduler.store import partitions
    from taskscheduler.store.db import Database

    run_migrations(database_url)
    database = Database(database_url)
    try:
        return partitions.maintain(
            database, width_sec=events_partition_sec, ahead=events_partitions_ahead, retention_sec=0
        ).created
    finally:
        database.dispose()


# The partitions of task_events come and go with time (store/partitions.py); the models describe the
# partitioned table only.
_EVENT_PARTITIONS = ("task_events_default", "task_events_p")


def include_name(name: str | None, type_: str, parent_names: MutableMapping[Any, str | None]) -> bool:
    """Alembic's `include_name`: every object but the partitions of task_events."""
    return not (type_ == "table" and name is not None and name.startswith(_EVENT_PARTITIONS))
