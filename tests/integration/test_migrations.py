"""The schema `alembic upgrade head` builds is the one the code describes, and migrating is idempotent."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from tests.harness import CLI, private_database

from taskscheduler.migrations import alembic_config, include_name, run_migrations
from taskscheduler.store import db
from taskscheduler.store.db import Database
from taskscheduler.store.models import metadata


def test_migrated_database_matches_the_models(services):
    with db.database_for(services.database_url).engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": False, "include_name": include_name}
        )
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_migrate_twice_is_a_no_op(services):
    run_migrations(services.database_url)
    run_migrations(services.database_url)
    with db.database_for(services.database_url).engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0008"


def _reloptions(conn, table: str) -> set[str]:
    from sqlalchemy import text

    value = conn.execute(text("SELECT reloptions FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}).scalar()
    return set(value or [])


def test_tasks_carries_its_vacuum_settings_and_downgrading_0007_removes_them(server_urls):
    with private_database(server_urls[0], f"taskscheduler_vacuum_{uuid.uuid4().hex[:8]}") as url:
        scratch = Database(url)
        try:
            with scratch.engine.connect() as conn:
                assert {"autovacuum_vacuum_scale_factor=0.01", "fillfactor=90"} <= _reloptions(conn, "tasks")
            command.downgrade(alembic_config(url), "0006")
            with scratch.engine.connect() as conn:
                assert _reloptions(conn, "tasks") == set()
        finally:
            scratch.dispose()


def test_migrate_on_a_fresh_database_creates_the_event_partitions_from_now_on(server_urls):
    # Without them the first events would land in the DEFAULT partition, and their period could never
    # get a range partition of its own.
    with private_database(server_urls[0], f"taskscheduler_fresh_{uuid.uuid4().hex[:8]}", migrate=False) as url:
        env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": server_urls[1]}
        env.update(EVENTS_PARTITION_SEC="3600", EVENTS_PARTITIONS_AHEAD="2")
        done = subprocess.run([CLI, "migrate"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "task_events partitions created: 3" in done.stderr + done.stdout
        scratch = Database(url)
        try:
            with scratch.engine.connect() as conn:
                covered = conn.execute(
                    text("WITH e AS (INSERT INTO task_events (task_id, to_status, attempt)"
                         " VALUES (gen_random_uuid(), 'PENDING', 1) RETURNING tableoid)"
                         " SELECT tableoid::regclass::text FROM e")
                ).scalar_one()  # fmt: skip
                conn.rollback()
            assert covered.startswith("task_events_p"), covered
        finally:
            scratch.dispose()


def test_downgrade_to_0001_and_back(server_urls):
    """On a scratch database: every migration's downgrade undoes its upgrade."""
    import uuid

    import psycopg
    from alembic import command
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from taskscheduler.config import normalize_database_url
    from taskscheduler.migrations import alembic_config

    admin_url = normalize_database_url(server_urls[0]).replace("postgresql+psycopg://", "postgresql://", 1)
    name = f"taskscheduler_migrations_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(normalize_database_url(admin_url)).set(database=name).render_as_string(False)
    scratch = Database(url)
    try:
        run_migrations(url)
        command.downgrade(alembic_config(url), "0001")
        with scratch.engine.connect() as conn:
            assert "process_heartbeats" not in inspect(conn).get_table_names()
            assert "idempotency_key" not in {c["name"] for c in inspect(conn).get_columns("tasks")}
        run_migrations(url)
        with scratch.engine.connect() as conn:
            opts = {"compare_type": True, "include_name": include_name}
            diff = compare_metadata(MigrationContext.configure(conn, opts=opts), metadata)
        assert diff == []
    finally:
        scratch.dispose()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_name_index_is_built_again_over_an_interrupted_build(server_urls):
    """0006 builds its index CONCURRENTLY (outside a transaction), so a failed or killed build leaves
    an INVALID index of that name behind: migrating again replaces it with a valid one."""
    index_state = """
        SELECT i.indisvalid, pg_get_indexdef(i.indexrelid)
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'tasks_name_created_idx'
        """
    with private_database(server_urls[0], f"taskscheduler_0006_{uuid.uuid4().hex[:8]}") as url:
        scratch = Database(url)
        try:
            command.downgrade(alembic_config(url), "0005")
            with scratch.engine.connect() as conn:
                assert conn.exec_driver_sql(index_state).one_or_none() is None
                conn.exec_driver_sql("INSERT INTO tasks (id, name, priority, queue, status, run_at, max_retries)"
                                     " SELECT gen_random_uuid(), 'twin', 5, 'default', 'PENDING', now(), 3"
                                     " FROM generate_series(1, 2)")  # fmt: skip
                conn.commit()
                conn.execution_options(isolation_level="AUTOCOMMIT")
                # A unique build over two equal names fails, and leaves the index INVALID, as a kill would.
                with pytest.raises(DBAPIError):
                    conn.exec_driver_sql("CREATE UNIQUE INDEX CONCURRENTLY tasks_name_created_idx ON tasks (name)")
                assert conn.exec_driver_sql(index_state).one()[0] is False
            run_migrations(url)
            with scratch.engine.connect() as conn:
                valid, definition = conn.exec_driver_sql(index_state).one()
            assert valid is True
            assert definition.endswith("USING btree (name, created_at DESC, id DESC)")
        finally:
            scratch.dispose()


def test_0008_moves_the_events_into_partitions_and_back(server_urls):
    """0008 keeps every event (id, time) in daily partitions of the days they span; its downgrade puts
    them back under the foreign key, less those whose task is gone."""
    events_query = "SELECT id, task_id, at, to_status FROM task_events ORDER BY id"
    with private_database(server_urls[0], f"taskscheduler_0008_{uuid.uuid4().hex[:8]}") as url:
        scratch = Database(url)
        try:
            command.downgrade(alembic_config(url), "0006")
            with scratch.engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO tasks (id, name, priority, queue, status, run_at, max_retries)"
                                     " SELECT gen_random_uuid(), 'old', 5, 'default', 'PENDING', now(), 3"
                                     " FROM generate_series(1, 3)")  # fmt: skip
                conn.exec_driver_sql(
                    "INSERT INTO task_events (task_id, at, to_status, attempt)"
                    " SELECT id, now() - make_interval(days => d), 'PENDING', 0"
                    " FROM tasks CROSS JOIN generate_series(0, 2) AS d"
                )
                before = conn.exec_driver_sql(events_query).all()
            run_migrations(url)
            with scratch.engine.begin() as conn:
                assert conn.exec_driver_sql(events_query).all() == before
                homes = conn.exec_driver_sql("SELECT DISTINCT tableoid::regclass::text FROM task_events").scalars()
                assert len(set(homes)) == 3 and not {"task_events_default"} & set(homes)
                fks = "SELECT count(*) FROM pg_constraint WHERE conrelid = 'task_events'::regclass AND contype = 'f'"
                assert conn.exec_driver_sql(fks).scalar_one() == 0
                # A task deleted: its events stay in the partitioned table until their partition goes.
                gone = before[0].task_id
                conn.exec_driver_sql("DELETE FROM tasks WHERE id = %(id)s", {"id": gone})
                conn.exec_driver_sql("INSERT INTO task_events (task_id, to_status, attempt) VALUES"
                                     " (%(id)s, 'PENDING', 0)", {"id": before[1].task_id})  # fmt: skip
            command.downgrade(alembic_config(url), "0006")
            with scratch.engine.begin() as conn:
                after = conn.exec_driver_sql(events_query).all()
                assert after[: len(before) - 3] == [e for e in before if e.task_id != gone]
                assert len(after) == len(before) - 3 + 1
                assert conn.exec_driver_sql(fks).scalar_one() == 1
        finally:
            scratch.dispose()
