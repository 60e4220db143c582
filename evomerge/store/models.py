"""SQLAlchemy ORM models of the evomerge store.

The Alembic migrations in ``migrations/versions`` are the source of truth for the schema; these
models must describe the same tables (``tests/test_store.py`` checks that autogenerate finds no
difference). Timestamps are naive UTC ``DateTime`` values (the store converts them to aware UTC
datetimes on the way out).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    space_yaml: Mapped[str] = mapped_column(Text)
    objectives: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    reference_point: Mapped[list[float] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    budget: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime())
    updated: Mapped[datetime] = mapped_column(DateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)


class Candidate(Base):
    __tablename__ = "candidates"
    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_candidates_study_number"),
        UniqueConstraint("study_id", "proposal_key", name="uq_candidates_study_proposal_key"),
        Index("ix_candidates_study_hash", "study_id", "recipe_hash"),
        Index("ix_candidates_study_state", "study_id", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    proposal_key: Mapped[str] = mapped_column(String(255))
    genome: Mapped[Any] = mapped_column(JSON)
    recipe_json: Mapped[str] = mapped_column(Text)
    recipe_hash: Mapped[str] = mapped_column(String(128))
    parents: Mapped[list[int]] = mapped_column(JSON)
    operator: Mapped[str | None] = mapped_column(String(100), nullable=True)
    generation: Mapped[int] = mapped_column(Integer)
    niche: Mapped[Any | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # Unused: written by evomerge versions that tracked which results the algorithm was told.
    # Kept so the schema still matches migration 0001 and old databases open unchanged.
    told_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    heartbeat: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime())
    started: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    finished: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)


class Score(Base):
    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("candidate_id", "objective", name="uq_scores_candidate_objective"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    objective: Mapped[str] = mapped_column(String(255))
    value: Mapped[float] = mapped_column(Double)


class SampleScores(Base):
    """Per-example scores of one candidate on one objective: little-endian float64 bytes."""

    __tablename__ = "sample_scores"
    __table_args__ = (
        UniqueConstraint("candidate_id", "objective", name="uq_sample_scores_candidate_objective"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    objective: Mapped[str] = mapped_column(String(255))
    count: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("study_id", "step", name="uq_checkpoints_study_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    algorithm: Mapped[str] = mapped_column(String(100))
    # JSON text written by the store (``json.dumps``, NaN/inf allowed, floats exact), not a JSON
    # column: PostgreSQL's json type rejects NaN, and algorithm states may hold it.
    state: Mapped[str] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime())


class HypervolumePoint(Base):
    """The study's hypervolume after its ``evaluations``-th finished candidate (complete or failed),
    against the study's reference point; ``complete`` of them had scores."""

    __tablename__ = "hypervolume_points"
    __table_args__ = (
        UniqueConstraint("study_id", "evaluations", name="uq_hypervolume_points_study_evaluations"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    evaluations: Mapped[int] = mapped_column(Integer)
    complete: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Double)
    recorded: Mapped[datetime] = mapped_column(DateTime())


class StudyEvent(Base):
    """News about a study's run worth keeping for ``status`` and the dashboard (a node lost, workers
    back): ``kind`` is a short word for programs, ``message`` the line the run printed."""

    __tablename__ = "study_events"
    __table_args__ = (Index("ix_study_events_study_id", "study_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    time: Mapped[datetime] = mapped_column(DateTime())
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
