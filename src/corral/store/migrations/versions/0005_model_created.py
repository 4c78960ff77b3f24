"""models.created_at: when a model was first declared (the `created` of GET /v1/models)

Revision ID: 0005
Revises: 0001 (chain it to the head on main when merging)

Existing rows take their last change as their creation, the best that is known of them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0002_revisions_scaling"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "models",
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
    )
    op.execute("UPDATE models SET created_at = updated_at")


def downgrade() -> None:
    op.drop_column("models", "created_at")
