"""The schema `alembic upgrade head` builds is the one the code describes, and migrating is idempotent."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from taskscheduler.migrations import run_migrations
from taskscheduler.store import db
from taskscheduler.store.models import metadata


def test_migrated_database_matches_the_models(services):
    with db.get_engine(services.database_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_migrate_twice_is_a_no_op(services):
    run_migrations(services.database_url)
    run_migrations(services.database_url)
    with db.get_engine(services.database_url).connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0002"
