"""The hypervolume series: one row per finished evaluation, written by the run as results land.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07

A study's hypervolume over evaluations and over wall time is read by the dashboard on every refresh;
storing it as the run goes (against the study's fixed reference point) keeps that a plain read instead
of a recomputation over every prefix of the study. Older databases get an empty table: a run resumed
on them fills in the series of what was evaluated before (``evomerge.run.hvseries``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hypervolume_points",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("evaluations", sa.Integer(), nullable=False),
        sa.Column("complete", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("recorded", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name="fk_hypervolume_points_study_id_studies", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_hypervolume_points"),
        sa.UniqueConstraint("study_id", "evaluations", name="uq_hypervolume_points_study_evaluations"),
    )


def downgrade() -> None:
    op.drop_table("hypervolume_points")
