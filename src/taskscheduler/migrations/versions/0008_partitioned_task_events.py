"""task_events partitioned by range of `at`, without the foreign key to tasks

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

Retention used to delete a task's events one by one (ON DELETE CASCADE: an index probe and a delete
per event, three or more per task, and as many dead row versions). Now the events go a whole
partition at a time (store/partitions.py). The existing rows are moved into the new table: daily
partitions cover the days they span; the scheduler creates the next partitions (EVENTS_PARTITION_SEC
wide) from there. The move copies the table inside the migration's transaction, holding its lock:
run it in a quiet moment on a large table (retention keeps the table at RETENTION_DAYS of events).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

DAY = timedelta(days=1)
_COLUMNS = "id, task_id, at, from_status, to_status, attempt, detail"


def upgrade() -> None:
    op.execute("ALTER TABLE task_events RENAME TO task_events_unpartitioned")
    op.execute("ALTER TABLE task_events_unpartitioned DROP CONSTRAINT task_events_task_id_fkey")
    op.execute("ALTER INDEX task_events_pkey RENAME TO task_events_unpartitioned_pkey")
    op.execute("ALTER INDEX task_events_task_idx RENAME TO task_events_unpartitioned_task_idx")
    op.execute(
        """
        CREATE TABLE task_events (
            id bigint NOT NULL DEFAULT nextval('task_events_id_seq'),
            task_id uuid NOT NULL,
            at timestamptz NOT NULL DEFAULT clock_timestamp(),
            from_status text,
            to_status text NOT NULL,
            attempt integer NOT NULL,
            detail text,
            CONSTRAINT task_events_pkey PRIMARY KEY (id, at)
        ) PARTITION BY RANGE (at)
        """
    )
    op.execute("ALTER SEQUENCE task_events_id_seq OWNED BY task_events.id")
    op.execute("CREATE INDEX task_events_task_idx ON task_events (task_id, id)")
    op.execute("CREATE TABLE task_events_default PARTITION OF task_events DEFAULT")
    bounds = op.get_bind().exec_driver_sql("SELECT min(at), max(at) FROM task_events_unpartitioned").one()
    if bounds[0] is not None:
        day = datetime.combine(bounds[0].astimezone(UTC).date(), datetime.min.time(), UTC)
        while day <= bounds[1]:
            op.execute(
                f"CREATE TABLE task_events_p{day:%Y%m%d_%H%M%S} PARTITION OF task_events "
                f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + DAY).isoformat()}')"
            )
            day += DAY
    op.execute(f"INSERT INTO task_events ({_COLUMNS}) SELECT {_COLUMNS} FROM task_events_unpartitioned")
    op.execute("DROP TABLE task_events_unpartitioned")


def downgrade() -> None:
    op.execute(
        """
        CREATE TABLE task_events_unpartitioned (
            id bigint NOT NULL DEFAULT nextval('task_events_id_seq'),
            task_id uuid NOT NULL,
            at timestamptz NOT NULL DEFAULT clock_timestamp(),
            from_status text,
            to_status text NOT NULL,
            attempt integer NOT NULL,
            detail text
        )
        """
    )
    # Events whose task is gone (waiting for their partition to be dropped) cannot meet the foreign key.
    op.execute(
        f"INSERT INTO task_events_unpartitioned ({_COLUMNS}) SELECT {_COLUMNS} FROM task_events e "
        "WHERE EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id)"
    )
    op.execute("ALTER SEQUENCE task_events_id_seq OWNED BY task_events_unpartitioned.id")
    op.execute("DROP TABLE task_events")
    op.execute("ALTER TABLE task_events_unpartitioned RENAME TO task_events")
    op.execute("ALTER TABLE task_events ADD CONSTRAINT task_events_pkey PRIMARY KEY (id)")
    op.execute(
        "ALTER TABLE task_events ADD CONSTRAINT task_events_task_id_fkey "
        "FOREIGN KEY (task_id) REFERENCES tasks (id) ON DELETE CASCADE"
    )
    op.execute("CREATE INDEX task_events_task_idx ON task_events (task_id, id)")
