"""Operations: idempotency keys, listing and retention indexes, process heartbeats

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
TERMINAL = "status IN ('SUCCEEDED', 'DEAD', 'CANCELLED')"


def upgrade() -> None:
    op.add_column("tasks", sa.Column("idempotency_key", sa.Text, nullable=True))
    op.add_column("tasks", sa.Column("request_hash", sa.Text, nullable=True))
    op.create_index(
        "tasks_idempotency_key_idx",
        "tasks",
        ["idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    # Keyset pagination orders by (created_at, id): the old index on created_at alone is replaced.
    op.create_index("tasks_created_id_idx", "tasks", ["created_at", "id"])
    op.drop_index("tasks_created_idx", table_name="tasks")
    op.create_index("tasks_status_created_idx", "tasks", ["status", "created_at", "id"])
    op.create_index("tasks_finished_idx", "tasks", ["finished_at"], postgresql_where=sa.text(TERMINAL))

    op.create_table(
        "process_heartbeats",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("started_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("seen_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("process_heartbeats_role_idx", "process_heartbeats", ["role", "hostname", "seen_at"])


def downgrade() -> None:
    op.drop_table("process_heartbeats")
    op.drop_index("tasks_finished_idx", table_name="tasks")
    op.drop_index("tasks_status_created_idx", table_name="tasks")
    op.create_index("tasks_created_idx", "tasks", ["created_at"])
    op.drop_index("tasks_created_id_idx", table_name="tasks")
    op.drop_index("tasks_idempotency_key_idx", table_name="tasks")
    op.drop_column("tasks", "request_hash")
    op.drop_column("tasks", "idempotency_key")
