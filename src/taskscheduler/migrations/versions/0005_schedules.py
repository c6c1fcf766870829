"""Recurring schedules: the schedules table, and the schedule and fire time of the tasks they create

Revision ID: 0005
Revises: 0004
Create Date: 2027-01-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
SCHEDULED = "schedule_id IS NOT NULL"
UNFINISHED = "schedule_id IS NOT NULL AND status NOT IN ('SUCCEEDED', 'DEAD', 'CANCELLED')"


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("max_retries", sa.Integer, nullable=False),
        sa.Column("timeout_sec", sa.Double, nullable=True),
        sa.Column("cron", sa.Text, nullable=True),
        sa.Column("every_sec", sa.Integer, nullable=True),
        sa.Column("timezone", sa.Text, nullable=False, server_default=sa.text("'UTC'")),
        sa.Column("start_at", TS, nullable=True),
        sa.Column("end_at", TS, nullable=True),
        sa.Column("jitter_sec", sa.Double, nullable=False, server_default=sa.text("0")),
        sa.Column("overlap", sa.Text, nullable=False, server_default=sa.text("'skip'")),
        sa.Column("catchup_window_sec", sa.Double, nullable=False, server_default=sa.text("300")),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("source", sa.Text, nullable=False, server_default=sa.text("'api'")),
        sa.Column("next_fire_at", TS, nullable=True),
        sa.Column("buffered_for", TS, nullable=True),
        sa.Column("last_fire_at", TS, nullable=True),
        sa.Column("fires", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("skips", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("misses", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("last_skipped_at", TS, nullable=True),
        sa.Column("last_skip_reason", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("name", name="schedules_name_key"),
        sa.CheckConstraint("(cron IS NULL) <> (every_sec IS NULL)", name="schedules_cron_xor_every"),
        sa.CheckConstraint("every_sec >= 1", name="schedules_every_sec_positive"),
        sa.CheckConstraint("priority BETWEEN 1 AND 10", name="schedules_priority_range"),
        sa.CheckConstraint("max_retries >= 0", name="schedules_max_retries_nonnegative"),
        sa.CheckConstraint("overlap IN ('skip', 'allow', 'buffer_one')", name="schedules_overlap_valid"),
        sa.CheckConstraint("source IN ('api', 'code')", name="schedules_source_valid"),
        sa.CheckConstraint("end_at > start_at", name="schedules_end_after_start"),
        sa.CheckConstraint("jitter_sec >= 0 AND catchup_window_sec >= 0", name="schedules_windows_nonnegative"),
    )
    op.create_index("schedules_due_idx", "schedules", ["next_fire_at"], postgresql_where=sa.text("NOT paused"))
    op.create_index(
        "schedules_buffered_idx",
        "schedules",
        ["buffered_for"],
        postgresql_where=sa.text("buffered_for IS NOT NULL AND NOT paused"),
    )
    # Nullable, no default: nothing is rewritten, and the partial indexes hold scheduled tasks only.
    op.add_column("tasks", sa.Column("schedule_id", UUID(as_uuid=True), nullable=True))
    op.add_column("tasks", sa.Column("scheduled_for", TS, nullable=True))
    op.create_index(
        "tasks_schedule_fire_idx",
        "tasks",
        ["schedule_id", "scheduled_for"],
        unique=True,
        postgresql_where=sa.text(SCHEDULED),
    )
    op.create_index(
        "tasks_schedule_created_idx", "tasks", ["schedule_id", "created_at", "id"], postgresql_where=sa.text(SCHEDULED)
    )
    op.create_index("tasks_schedule_unfinished_idx", "tasks", ["schedule_id"], postgresql_where=sa.text(UNFINISHED))


def downgrade() -> None:
    op.drop_index("tasks_schedule_unfinished_idx", table_name="tasks")
    op.drop_index("tasks_schedule_created_idx", table_name="tasks")
    op.drop_index("tasks_schedule_fire_idx", table_name="tasks")
    op.drop_column("tasks", "scheduled_for")
    op.drop_column("tasks", "schedule_id")
    op.drop_table("schedules")
