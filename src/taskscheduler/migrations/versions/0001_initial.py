"""tasks, task_events, dlq_events

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("payload", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("run_at", TS, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("max_retries", sa.Integer, nullable=False),
        sa.Column("retry_base_attempt", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("timeout_sec", sa.Double, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("result", postgresql.JSONB, nullable=True),
        sa.Column("dead_reason", sa.Text, nullable=True),
        sa.Column("dlq_recorded", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("published_at", TS, nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.CheckConstraint(
            "status IN ('PENDING', 'ENQUEUED', 'STARTED', 'SUCCEEDED', 'FAILED', 'DEAD', 'CANCELLED')",
            name="tasks_status_valid",
        ),
        sa.CheckConstraint("priority BETWEEN 1 AND 10", name="tasks_priority_range"),
        sa.CheckConstraint("max_retries >= 0", name="tasks_max_retries_nonnegative"),
        sa.CheckConstraint("attempt >= 0", name="tasks_attempt_nonnegative"),
        sa.CheckConstraint(
            "(finished_at IS NOT NULL) = (status IN ('SUCCEEDED', 'DEAD', 'CANCELLED'))",
            name="tasks_finished_iff_terminal",
        ),
    )
    op.create_index(
        "tasks_dispatch_idx", "tasks", ["run_at"], postgresql_where=sa.text("status IN ('PENDING', 'FAILED')")
    )
    op.create_index("tasks_started_idx", "tasks", ["started_at"], postgresql_where=sa.text("status = 'STARTED'"))
    op.create_index("tasks_enqueued_idx", "tasks", ["published_at"], postgresql_where=sa.text("status = 'ENQUEUED'"))
    op.create_index(
        "tasks_dead_unrecorded_idx",
        "tasks",
        ["published_at"],
        postgresql_where=sa.text("status = 'DEAD' AND NOT dlq_recorded"),
    )
    op.create_index("tasks_created_idx", "tasks", ["created_at"])

    op.create_table(
        "task_events",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "task_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("at", TS, nullable=False, server_default=sa.func.clock_timestamp()),
        sa.Column("from_status", sa.Text, nullable=True),
        sa.Column("to_status", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("task_events_task_idx", "task_events", ["task_id", "id"])

    op.create_table(
        "dlq_events",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("task_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("task_name", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("task_id", "attempt", name="dlq_events_task_attempt_key"),
    )
    op.create_index("dlq_events_created_idx", "dlq_events", ["created_at"])


def downgrade() -> None:
    op.drop_table("dlq_events")
    op.drop_table("task_events")
    op.drop_table("tasks")
