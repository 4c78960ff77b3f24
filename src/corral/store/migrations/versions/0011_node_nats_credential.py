"""nodes.nats_credential_hash: the digest of each worker's NATS secret (auth callout)

Revision ID: 0011
Revises: 0008

Null for nodes registered while NATS authentication was off: such a node gets a secret at
its next registration.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("nats_credential_hash", sa.String(128), nullable=True))


def downgrade() -> None:
    op.drop_column("nodes", "nats_credential_hash")
