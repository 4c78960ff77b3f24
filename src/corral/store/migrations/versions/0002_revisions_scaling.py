"""spec revisions on replicas and load information, rollout and scaling settings

Revision ID: 0002_revisions_scaling
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002_revisions_scaling"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    jsonb = postgresql.JSONB(astext_type=sa.Text())
    op.add_column(
        "models", sa.Column("spec_hash", sa.String(length=64), server_default="", nullable=False)
    )
    op.add_column("models", sa.Column("rollout", jsonb, server_default="{}", nullable=False))
    op.add_column("models", sa.Column("scaling", jsonb, nullable=True))
    op.add_column(
        "replicas", sa.Column("revision", sa.String(length=64), server_default="", nullable=False)
    )
    op.add_column("replicas", sa.Column("replaces", sa.Integer(), nullable=True))
    # load information per (model, revision); rows from before keep the revision "" (unknown),
    # which no spec has: the reconciler never starts a replica from them
    op.add_column(
        "model_load_info",
        sa.Column("revision", sa.String(length=64), server_default="", nullable=False),
    )
    op.add_column("model_load_info", sa.Column("error", sa.Text(), nullable=True))
    op.add_column(
        "model_load_info",
        sa.Column("failed_at", sa.Double(), server_default="0", nullable=False),
    )
    op.drop_constraint("model_load_info_pkey", "model_load_info", type_="primary")
    op.create_primary_key("model_load_info_pkey", "model_load_info", ["model", "revision"])


def downgrade() -> None:
    op.execute("DELETE FROM model_load_info WHERE error IS NOT NULL")
    op.execute(
        "DELETE FROM model_load_info a USING model_load_info b "
        "WHERE a.model = b.model AND a.loaded_at < b.loaded_at"
    )
    op.drop_constraint("model_load_info_pkey", "model_load_info", type_="primary")
    op.create_primary_key("model_load_info_pkey", "model_load_info", ["model"])
    op.drop_column("model_load_info", "failed_at")
    op.drop_column("model_load_info", "error")
    op.drop_column("model_load_info", "revision")
    op.drop_column("replicas", "replaces")
    op.drop_column("replicas", "revision")
    op.drop_column("models", "scaling")
    op.drop_column("models", "rollout")
    op.drop_column("models", "spec_hash")
