"""models.capabilities: the endpoints a model may serve, narrowing its backend's

Revision ID: 0004_model_capabilities
Revises: 0001 (chain it after 0002_revisions_scaling / 0003 when those reach main)

`capabilities` is a JSON list of capability names (corral.backends.capabilities); null means
every endpoint the model's backend serves, which is what every existing model did.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004_model_capabilities"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "models",
        sa.Column("capabilities", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("models", "capabilities")
