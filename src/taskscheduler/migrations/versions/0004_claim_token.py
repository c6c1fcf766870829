"""Claim token: a worker whose claim committed but whose reply was lost recognises its own claim

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing, and tasks claimed before it simply have none.
    op.add_column("tasks", sa.Column("claim_token", UUID(as_uuid=True), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "claim_token")
