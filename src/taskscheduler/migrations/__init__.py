"""Alembic migrations; run with `taskscheduler migrate` (see `run_migrations`)."""

from __future__ import annotations

from pathlib import Path

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
