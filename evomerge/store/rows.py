"""What the store hands back: frozen rows detached from the database session."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from .models import Candidate, Study
from .values import aware


@dataclass(frozen=True)
class StudyRow:
    id: int
    name: str
    space_yaml: str
    objectives: list[dict[str, Any]]
    reference_point: list[float] | None
    status: str
    budget: int | None
    created: datetime
    updated: datetime
    lease_owner: str | None
    lease_expires: datetime | None


@dataclass(frozen=True)
class CandidateRow:
    number: int
    proposal_key: str
    genome: Any
    recipe_json: str
    recipe_hash: str
    parents: list[int]
    operator: str | None
    generation: int
    niche: Any
    state: str
    attempts: int
    error: str | None
    worker: str | None
    timings: dict[str, Any] | None
    heartbeat: datetime | None
    created: datetime
    started: datetime | None
    finished: datetime | None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def estimated(self) -> bool:
        """Whether its scores are estimates from an anchor subset (multi-fidelity), not full evaluations:
        such a candidate is never a front member, nor counted in best scores or the hypervolume."""
        return bool((self.timings or {}).get("estimated"))


class CheckpointRow(NamedTuple):
    step: int
    algorithm: str
    state: dict[str, Any]


def study_row(s: Study) -> StudyRow:
    return StudyRow(
        id=s.id,
        name=s.name,
        space_yaml=s.space_yaml,
        objectives=list(s.objectives),
        reference_point=list(s.reference_point) if s.reference_point is not None else None,
        status=s.status,
        budget=s.budget,
        created=aware(s.created),  # type: ignore[arg-type]
        updated=aware(s.updated),  # type: ignore[arg-type]
        lease_owner=s.lease_owner,
        lease_expires=aware(s.lease_expires),
    )


def candidate_row(c: Candidate, scores: dict[str, float] | None = None) -> CandidateRow:
    return CandidateRow(
        number=c.number,
        proposal_key=c.proposal_key,
        genome=c.genome,
        recipe_json=c.recipe_json,
        recipe_hash=c.recipe_hash,
        parents=list(c.parents or []),
        operator=c.operator,
        generation=c.generation,
        niche=c.niche,
        state=c.state,
        attempts=c.attempts,
        error=c.error,
        worker=c.worker,
        timings=c.timings,
        heartbeat=aware(c.heartbeat),
        created=aware(c.created),  # type: ignore[arg-type]
        started=aware(c.started),
        finished=aware(c.finished),
        scores=dict(scores or {}),
    )
