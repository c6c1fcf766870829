"""Per-table vacuum settings for tasks: vacuum soon after a held snapshot ends

Revision ID: 0007
Revises: 0006
Create Date: 2027-02-10
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Every task is updated three times or more (ENQUEUED, STARTED, its outcome, heartbeats); each
# status change leaves a dead version in the tasks table and entries in the partial indexes that the
# scheduler scans. PostgreSQL's defaults wait for 20% of a table to be dead before vacuuming it: on
# a table of 10M finished tasks, 2M dead versions. These vacuum after 1% (at least 1,000 rows), and
# without the default cost pauses, so that once a held snapshot (a long query, a transaction left
# open) ends, its backlog is cleaned in one pass instead of over several naptimes.
# fillfactor 90 leaves room on each page for the heartbeat updates, which touch no indexed column and
# so can be HOT (no new index entries) when the new version fits on the same page.
TASKS = {
    "fillfactor": "90",
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.02",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_vacuum_cost_delay": "0",
}


def _set(table: str, options: dict[str, str]) -> str:
    return f"ALTER TABLE {table} SET ({', '.join(f'{k} = {v}' for k, v in options.items())})"


def _reset(table: str, options: dict[str, str]) -> str:
    return f"ALTER TABLE {table} RESET ({', '.join(options)})"


def upgrade() -> None:
    # task_events takes none: 0008 makes it a partitioned table (insert-only partitions, dropped whole).
    op.execute(_set("tasks", TASKS))


def downgrade() -> None:
    op.execute(_reset("tasks", TASKS))
