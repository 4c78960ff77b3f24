"""usage per API key, model and minute; per-key limits on api_keys

Revision ID: 0008
Revises: 0009 (the head on main when this was merged with it; re-chain to the head when merging)

`usage` rows are added to by every frontend's batched flush (INSERT ... ON CONFLICT DO
UPDATE); `api_keys.requests_per_minute` and `tokens_per_day` are null for no limit.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("requests_per_minute", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("tokens_per_day", sa.BigInteger(), nullable=True))
    op.create_table(
        "usage",
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("bucket", sa.Double(), nullable=False),
        sa.Column("key_name", sa.String(255), nullable=False, server_default=""),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("errors", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("limited", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("key_id", "model", "bucket"),
    )
    op.create_index("usage_bucket", "usage", ["bucket"])


def downgrade() -> None:
    op.drop_index("usage_bucket", table_name="usage")
    op.drop_table("usage")
    op.drop_column("api_keys", "tokens_per_day")
    op.drop_column("api_keys", "requests_per_minute")
