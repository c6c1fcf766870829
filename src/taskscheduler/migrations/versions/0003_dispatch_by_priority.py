"""Dispatch by priority: an index that serves each queue's batch in priority, then run_at, order

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DUE = "status IN ('PENDING', 'FAILED')"


def upgrade() -> None:
    # It replaces the index on run_at alone: with both, the planner may walk every due task in
    # run_at order to find the few of one priority.
    op.create_index("tasks_due_by_priority_idx", "tasks", ["priority", "run_at"], postgresql_where=sa.text(DUE))
    op.drop_index("tasks_dispatch_idx", table_name="tasks")


def downgrade() -> None:
    op.create_index("tasks_dispatch_idx", "tasks", ["run_at"], postgresql_where=sa.text(DUE))
    op.drop_index("tasks_due_by_priority_idx", table_name="tasks")
