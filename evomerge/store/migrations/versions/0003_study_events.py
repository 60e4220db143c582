"""Study events: what happened to a study's run that the user should still see later (a node lost).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

A run prints its cluster news as it goes; stored, ``evomerge status`` and the dashboard show it too,
after the run's own output is gone. Older databases get an empty table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "study_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name="fk_study_events_study_id_studies", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_study_events"),
    )
    op.create_index("ix_study_events_study_id", "study_events", ["study_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_study_events_study_id", table_name="study_events")
    op.drop_table("study_events")
