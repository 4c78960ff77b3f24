"""models.max_concurrency and models.deadline; load_jobs.failures (admission control)

Revision ID: 0009
Revises: 0006 (the head on main when this was written; re-chain to the head when merging)

`max_concurrency` is the requests one replica may have in flight across the cluster (0 =
unlimited, null = the backend's default); `deadline` the seconds a request may wait for a slot
(null = the server's default). `load_jobs.error_code` keeps a failed load's wire code, so every
frontend answers the same error; `load_jobs.failures` counts a model's failed loads in a row, for
the growing backoff between attempts (a success deletes the row, which resets it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("max_concurrency", sa.Integer(), nullable=True))
    op.add_column("models", sa.Column("deadline", sa.Double(), nullable=True))
    op.add_column(
        "load_jobs",
        sa.Column("failures", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column("load_jobs", sa.Column("error_code", sa.String(32), nullable=True))


def downgrade() -> None:
    op.drop_column("load_jobs", "error_code")
    op.drop_column("load_jobs", "failures")
    op.drop_column("models", "deadline")
    op.drop_column("models", "max_concurrency")
