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


# The partitions of task_events come and go with time (store/partitions.py); the models describe the
# partitioned table only.
_EVENT_PARTITIONS = ("task_events_default", "task_events_p")


def include_name(name: str | None, type_: str, parent_names: MutableMapping[Any, str | None]) -> bool:
    """Alembic's `include_name`: every object but the partitions of task_events."""
    return not (type_ == "table" and name is not None and name.startswith(_EVENT_PARTITIONS))
