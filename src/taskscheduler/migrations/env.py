from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from taskscheduler.migrations import include_name
from taskscheduler.store.models import metadata

# Several roles may start at once and all run `migrate`; one advisory lock makes them take turns.
MIGRATION_LOCK_ID = 7_412_093_118


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.commit()
        try:
            context.configure(
                connection=connection, target_metadata=metadata, compare_type=True, include_name=include_name
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
            connection.commit()
    engine.dispose()


run_migrations_online()
