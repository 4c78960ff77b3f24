"""models.capabilities: the endpoints a model may serve, narrowing its backend's

Revision ID: 0006
Revises: 0005 (the head on main when this was written; re-chain to the head when merging)

`capabilities` is a JSON list of capability names (corral.backends.capabilities); null means
every endpoint the model's backend serves, which is what every existing model did.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "models",
        sa.Column("capabilities", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("models", "capabilities")
