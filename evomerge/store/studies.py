"""Studies: creation, lookup, names, candidate counts, status and reference point."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .engine import Database
from .errors import StudyExists, StudyNotFound
from .models import Candidate, Study
from .rows import StudyRow, study_row
from .values import aware, check_reference_point, normalise_objectives, now

STUDY_STATUSES = ("running", "paused", "done", "failed")
CANDIDATE_STATES = ("queued", "running", "complete", "failed")


def find_study(s: Session, name: str, lock: bool = False) -> Study:
    q = select(Study).where(Study.name == name)
    if lock:
        q = q.with_for_update()
    st = s.execute(q).scalar_one_or_none()
    if st is None:
        raise StudyNotFound(name)
    return st


def study_id(s: Session, name: str) -> int:
    # A study's id never changes and no study is ever deleted, so the id is looked up once per engine:
    # it was a query of its own in most store calls, a sixth of a candidate's store time on PostgreSQL.
    bind = s.get_bind()
    ids = getattr(bind, "_evomerge_study_ids", None)
    if ids is None:
        ids = {}
        bind._evomerge_study_ids = ids  # type: ignore[union-attr]
    sid = ids.get(name)
    if sid is not None:
        return sid
    sid = s.execute(select(Study.id).where(Study.name == name)).scalar_one_or_none()
    if sid is None:
        raise StudyNotFound(name)
    ids[name] = sid
    return sid


def _counts_by_state(rows: Sequence[Any]) -> dict[str, int]:
    """Rows of (state, count, attempts) as {state: count, ..., attempts, total}."""
    out = {k: 0 for k in CANDIDATE_STATES}
    attempts = 0
    for state, n, a in rows:
        out[state] = int(n)
        attempts += int(a)
    out["attempts"] = attempts
    out["total"] = sum(out[k] for k in CANDIDATE_STATES)
    return out


_STATE_COUNTS = (Candidate.state, func.count(Candidate.id), func.coalesce(func.sum(Candidate.attempts), 0))


class StudyMethods:
    db: Database

    def create_study(
        self,
        name: str,
        space_yaml: str,
        objectives: Sequence[Mapping[str, Any]],
        budget: int | None,
        reference_point: Sequence[float] | None = None,
        status: str = "running",
    ) -> int:
        """Create a study and return its id. Raises ``StudyExists`` if the name is taken."""
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise ValueError(f"study name must be a non-empty string of at most 255 characters, got {name!r}")
        objs = normalise_objectives(objectives)
        if budget is not None and (not isinstance(budget, (int, np.integer)) or budget < 0):
            raise ValueError(f"budget must be a non-negative integer or None, got {budget!r}")
        if status not in STUDY_STATUSES:
            raise ValueError(f"study status must be one of {STUDY_STATUSES}, got {status!r}")
        ref = check_reference_point(reference_point, len(objs))
        t = now()
        try:
            with self.db.session(write=True) as s:
                st = Study(
                    name=name,
                    space_yaml=space_yaml,
                    objectives=objs,
                    reference_point=ref,
                    status=status,
                    budget=None if budget is None else int(budget),
                    created=t,
                    updated=t,
                )
                s.add(st)
                s.flush()
                return st.id
        except IntegrityError:
            raise StudyExists(name) from None

    def get_study(self, name: str) -> StudyRow:
        with self.db.session() as s:
            return study_row(find_study(s, name))

    def has_study(self, name: str) -> bool:
        with self.db.session() as s:
            return s.execute(select(Study.id).where(Study.name == name)).first() is not None

    def free_study_name(self, base: str) -> str:
        """``base`` if no study has that name, else the first free ``base-2``, ``base-3``, ..."""
        with self.db.session() as s:
            taken = set(
                s.execute(
                    select(Study.name).where(or_(Study.name == base, Study.name.like(f"{base}-%")))
                ).scalars()
            )
        if base not in taken:
            return base
        i = 2
        while f"{base}-{i}" in taken:
            i += 1
        return f"{base}-{i}"

    def study_counts(self, name: str) -> dict[str, int]:
        """Candidate counts of one study: queued, running, complete, failed, total, attempts."""
        with self.db.session() as s:
            sid = study_id(s, name)
            rows = s.execute(
                select(*_STATE_COUNTS).where(Candidate.study_id == sid).group_by(Candidate.state)
            ).all()
        return _counts_by_state(rows)

    def count_candidates(self, name: str) -> int:
        """How many candidates the study has, in any state."""
        with self.db.session() as s:
            sid = study_id(s, name)
            return int(
                s.execute(select(func.count(Candidate.id)).where(Candidate.study_id == sid)).scalar() or 0
            )

    def list_studies(self) -> list[dict[str, Any]]:
        """One dict per study: study, state, budget, queued, running, complete, failed, attempts
        (evaluations started, retries included), total, objectives, created, updated, lease_owner,
        lease_expires."""
        with self.db.session() as s:
            studies = s.execute(select(Study).order_by(Study.id)).scalars().all()
            counts = s.execute(
                select(Candidate.study_id, *_STATE_COUNTS).group_by(Candidate.study_id, Candidate.state)
            ).all()
        per: dict[int, list[Any]] = {}
        for sid, *rest in counts:
            per.setdefault(sid, []).append(rest)
        return [
            {
                "study": st.name,
                "state": st.status,
                "budget": st.budget,
                **_counts_by_state(per.get(st.id, [])),
                "objectives": list(st.objectives),
                "created": aware(st.created),
                "updated": aware(st.updated),
                "lease_owner": st.lease_owner,
                "lease_expires": aware(st.lease_expires),
            }
            for st in studies
        ]

    def set_study_status(self, name: str, status: str) -> None:
        if status not in STUDY_STATUSES:
            raise ValueError(f"study status must be one of {STUDY_STATUSES}, got {status!r}")
        with self.db.session(write=True) as s:
            st = find_study(s, name)
            st.status = status
            st.updated = now()

    def set_reference_point(self, name: str, reference_point: Sequence[float] | None) -> None:
        with self.db.session(write=True) as s:
            st = find_study(s, name)
            st.reference_point = check_reference_point(reference_point, len(st.objectives))
            st.updated = now()
