"""models.routing: per-model routing weights

Revision ID: 0010
Revises: 0006 (the head on main when this was written; re-chain to the head when merging)

`routing` is a JSON object of `RoutingWeights` fields (corral.domain.routing_weights); null
means the default weights, which is what every existing model routed with.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "models",
        sa.Column("routing", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("models", "routing")
