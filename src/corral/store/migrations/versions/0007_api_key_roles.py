"""api_keys.role and api_keys.models: admin or inference keys, optionally limited to models

Revision ID: 0007
Revises: 0006 (the head on main when this was written; re-chain to the head when merging)

Every key stored before this revision could use the admin API, so existing rows become
`admin` keys (their holders keep what they had); new rows default to `inference`.
`models` is a JSON list of model names an inference key may use; null means every model.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "api_keys",
        sa.Column("role", sa.String(16), nullable=False, server_default="admin"),
    )
    op.alter_column("api_keys", "role", server_default="inference")
    op.add_column(
        "api_keys",
        sa.Column("models", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("api_keys", "models")
    op.drop_column("api_keys", "role")
