"""Candidates: proposal, dispatch, results, retries, and the queries over them.

Writes are idempotent, keyed by candidate: a proposal key maps to one candidate number, and a
result for a candidate that is already complete or failed (a retried task delivering twice)
changes nothing. A NaN, infinite or missing score records the candidate as failed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from evomerge.front import non_dominated, to_minimization

from .engine import Database
from .errors import CandidateNotFound, StoreError
from .models import Candidate, SampleScores, Score
from .rows import CandidateRow, candidate_row
from .studies import CANDIDATE_STATES, find_study, study_id
from .values import clean_scores, clean_timings, json_strict, now, pack, unpack

log = logging.getLogger(__name__)

_ACTIVE = ("queued", "running")
_TERMINAL = ("complete", "failed")
_MAX_ERROR_CHARS = 65_536


def find_candidate(s: Session, sid: int, study: str, number: int, lock: bool = False) -> Candidate:
    q = select(Candidate).where(Candidate.study_id == sid, Candidate.number == int(number))
    if lock:
        q = q.with_for_update()
    c = s.execute(q).scalar_one_or_none()
    if c is None:
        raise CandidateNotFound(study, number)
    return c


def candidate_rows(s: Session, sid: int, *conds: Any) -> list[CandidateRow]:
    """Candidates of study ``sid`` matching ``conds``, in number order, with their scores."""
    cands = (
        s.execute(select(Candidate).where(Candidate.study_id == sid, *conds).order_by(Candidate.number))
        .scalars()
        .all()
    )
    if not cands:
        return []
    by_id: dict[int, dict[str, float]] = {c.id: {} for c in cands}
    q = select(Score.candidate_id, Score.objective, Score.value)
    if len(cands) <= 500:
        q = q.where(Score.candidate_id.in_(list(by_id)))
    else:  # a long IN list costs more than reading the study's other scores
        q = q.join(Candidate, Candidate.id == Score.candidate_id).where(Candidate.study_id == sid)
    for cid, obj, val in s.execute(q):
        if cid in by_id:
            by_id[cid][obj] = val
    return [candidate_row(c, by_id[c.id]) for c in cands]


def _write_scores(s: Session, cid: int, scores: dict[str, float], samples: dict[str, np.ndarray]) -> None:
    """Replace the candidate's scores and per-example scores of the objectives given."""
    if scores:
        s.execute(delete(Score).where(Score.candidate_id == cid, Score.objective.in_(list(scores))))
        s.add_all(Score(candidate_id=cid, objective=k, value=v) for k, v in scores.items())
    if samples:
        s.execute(
            delete(SampleScores).where(SampleScores.candidate_id == cid, SampleScores.objective.in_(list(samples)))
        )
        s.add_all(
            SampleScores(candidate_id=cid, objective=k, count=int(a.size), data=pack(a)) for k, a in samples.items()
        )


def _by_key(s: Session, sid: int, key: str) -> tuple[int, str] | None:
    row = s.execute(
        select(Candidate.number, Candidate.recipe_hash).where(Candidate.study_id == sid, Candidate.proposal_key == key)
    ).first()
    return (row[0], row[1]) if row is not None else None


class CandidateMethods:
    db: Database

    # ---------------------------------------------------------------------------- writes

    def add_candidate(
        self,
        study: str,
        proposal_key: str,
        genome: Any,
        recipe_json: str | Mapping[str, Any] | Any,
        recipe_hash: str,
        parents: Sequence[int] = (),
        generation: int = 0,
        operator: str | None = None,
        niche: Any = None,
    ) -> int:
        """Record a proposed candidate (state ``queued``) and return its number (1, 2, ... per study).

        Idempotent on (study, proposal_key): proposing the same key again returns the existing
        number and changes nothing. ``recipe_json`` is the recipe's canonical JSON text (a mapping or
        an object with ``canonical_json()`` is serialised here). ``parents`` are candidate numbers.
        """
        key = str(proposal_key)
        if not key or len(key) > 255:
            raise ValueError(f"proposal_key must be a non-empty string of at most 255 characters, got {key!r}")
        genome_data = json_strict(genome, "genome")
        if hasattr(recipe_json, "canonical_json"):
            recipe_json = recipe_json.canonical_json()
        elif not isinstance(recipe_json, str):
            recipe_json = json.dumps(json_strict(recipe_json, "recipe"), sort_keys=True, separators=(",", ":"))
        parent_list = [int(p) for p in parents]
        niche_data = json_strict(niche, "niche")
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            existing = _by_key(s, sid, key)
            if existing is not None:
                if existing[1] != recipe_hash:
                    log.warning(
                        "study %s: proposal %r was recorded with recipe %s, now proposed with %s; "
                        "keeping candidate %d as recorded",
                        study, key, existing[1], recipe_hash, existing[0],
                    )
                return existing[0]
            for _ in range(10):
                last = s.execute(select(func.max(Candidate.number)).where(Candidate.study_id == sid)).scalar()
                number = (last or 0) + 1
                try:
                    with s.begin_nested():  # a savepoint: a clash leaves the transaction usable
                        s.add(
                            Candidate(
                                study_id=sid,
                                number=number,
                                proposal_key=key,
                                genome=genome_data,
                                recipe_json=recipe_json,
                                recipe_hash=str(recipe_hash),
                                parents=parent_list,
                                operator=operator,
                                generation=int(generation),
                                niche=niche_data,
                                state="queued",
                                attempts=0,
                                created=now(),
                            )
                        )
                    return number
                except IntegrityError:  # a concurrent writer took the number or the key
                    existing = _by_key(s, sid, key)
                    if existing is not None:
                        return existing[0]
            raise StoreError(f"study {study}: could not allocate a candidate number (too much contention)")

    def _update_candidate(self, study: str, number: int, states: Sequence[str], **values: Any) -> bool:
        """Set ``values`` on the candidate if its state is one of ``states``; returns whether it was."""
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            res = s.execute(
                update(Candidate)
                .where(Candidate.study_id == sid, Candidate.number == int(number), Candidate.state.in_(states))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 0:  # type: ignore[attr-defined]
                find_candidate(s, sid, study, number)  # raises CandidateNotFound
                return False
            return True

    def mark_running(self, study: str, number: int, worker: str | None = None) -> bool:
        """Mark a queued (or re-dispatched running) candidate running on ``worker``.

        Dispatching is not an attempt: ``attempts`` counts evaluations that reached a worker, charged
        when the worker reports (``attempt=True`` on the result, ``count_attempt`` on its death), so a
        task lost to Ctrl-C or a closed pool before any worker answered costs the candidate nothing.
        Returns False (and changes nothing) if the candidate is already complete or failed.
        """
        t = now()
        return self._update_candidate(study, number, _ACTIVE, state="running", worker=worker, started=t, heartbeat=t)

    def count_attempt(self, study: str, number: int) -> int:
        """Charge one evaluation that reached a worker (one whose worker died on it); returns the count.

        A finished candidate is not charged (a duplicate report of a retried task)."""
        with self.db.session(write=True) as s:
            c = find_candidate(s, study_id(s, study), study, number, lock=True)
            if c.state not in _TERMINAL:
                c.attempts = int(c.attempts) + 1
            return int(c.attempts)

    def heartbeat(self, study: str, numbers: int | Iterable[int]) -> int:
        """Refresh the heartbeat of running candidates; returns how many rows were touched."""
        nums = [int(numbers)] if isinstance(numbers, (int, np.integer)) else [int(n) for n in numbers]
        if not nums:
            return 0
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            res = s.execute(
                update(Candidate)
                .where(Candidate.study_id == sid, Candidate.number.in_(nums), Candidate.state == "running")
                .values(heartbeat=now())
                .execution_options(synchronize_session=False)
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    def complete_candidate(
        self,
        study: str,
        number: int,
        scores: Mapping[str, float],
        sample_scores: Mapping[str, Sequence[float]] | None = None,
        timings: Mapping[str, Any] | None = None,
        attempt: bool = False,
    ) -> Literal["complete", "failed"] | None:
        """Record a candidate's result; ``attempt``: it came from a worker's evaluation, count it.

        Returns ``"complete"`` when recorded, ``"failed"`` when a score (or per-example score) is NaN,
        infinite or not a number (the candidate is recorded failed with that error, no scores kept),
        and None when the candidate was already complete or failed (a duplicate result from a
        retried task: nothing changes).
        Per-example scores are stored as float64 arrays, so they read back bit-exact.
        """
        clean, samples, bad = clean_scores(scores, sample_scores)
        if not clean and bad is None:
            bad = "no scores returned"
        tim = clean_timings(timings)
        t = now()
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            c = find_candidate(s, sid, study, number, lock=True)
            if c.state in _TERMINAL:
                return None
            if attempt:
                c.attempts = int(c.attempts) + 1
            c.finished = t
            c.heartbeat = t
            if tim is not None:
                c.timings = tim
            if bad is not None:
                c.state = "failed"
                c.error = bad
                return "failed"
            # Only complete candidates hold scores, and they never get here: nothing old to clear.
            _write_scores(s, c.id, clean, samples)
            c.state = "complete"
            c.error = None
            return "complete"

    def add_scores(
        self,
        study: str,
        number: int,
        scores: Mapping[str, float],
        sample_scores: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        """Add or replace scores of a complete candidate (e.g. a held-out evaluation of the front)."""
        clean, samples, bad = clean_scores(scores, sample_scores)
        if bad is not None:
            raise ValueError(bad)
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            c = find_candidate(s, sid, study, number, lock=True)
            if c.state != "complete":
                raise ValueError(f"study {study}: candidate {number} is {c.state}, not complete")
            _write_scores(s, c.id, clean, samples)

    def fail_candidate(self, study: str, number: int, error: str, timings: Mapping[str, Any] | None = None,
                       attempt: bool = False) -> bool:
        """Record a queued/running candidate as failed (``attempt``: a worker's evaluation failed it, count
        it); returns False (no-op) if already complete/failed."""
        values: dict[str, Any] = {"state": "failed", "error": str(error)[:_MAX_ERROR_CHARS], "finished": now()}
        if attempt:
            values["attempts"] = Candidate.attempts + 1
        tim = clean_timings(timings)
        if tim is not None:
            values["timings"] = tim
        return self._update_candidate(study, number, _ACTIVE, **values)

    def set_niche(self, study: str, proposal_key: int | str, niche: Any) -> bool:
        """Record the niche (plain JSON) an algorithm placed the candidate of ``proposal_key`` in, once its
        result was told (M2N2: the examples it holds); returns False when no candidate has that key."""
        data = json_strict(niche, "niche")
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            res = s.execute(
                update(Candidate)
                .where(Candidate.study_id == sid, Candidate.proposal_key == str(proposal_key))
                .values(niche=data)
                .execution_options(synchronize_session=False)
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def requeue(self, study: str, number: int) -> bool:
        """Put a running or failed candidate back in the queue (for a retry); the last error is kept.

        Returns False (no-op) for a complete candidate; True if it is now queued.
        """
        return self._update_candidate(
            study, number, ("queued", "running", "failed"),
            state="queued", worker=None, heartbeat=None, started=None, finished=None,
        )

    # ---------------------------------------------------------------------------- reads

    def candidates(self, study: str, state: str | Iterable[str] | None = None) -> list[CandidateRow]:
        """Candidates of a study in number order, with their scores; optionally only some states."""
        conds: list[Any] = []
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            unknown = set(states) - set(CANDIDATE_STATES)
            if unknown:
                raise ValueError(f"unknown candidate state(s) {sorted(unknown)}; states are {CANDIDATE_STATES}")
            conds.append(Candidate.state.in_(states))
        with self.db.session() as s:
            return candidate_rows(s, study_id(s, study), *conds)

    def get_candidate(self, study: str, number: int) -> CandidateRow:
        with self.db.session() as s:
            rows = candidate_rows(s, study_id(s, study), Candidate.number == int(number))
        if not rows:
            raise CandidateNotFound(study, number)
        return rows[0]

    def pending_candidates(self, study: str) -> list[CandidateRow]:
        """Queued or running candidates (a resumed driver re-dispatches these)."""
        return self.candidates(study, _ACTIVE)

    def find_by_hash(self, study: str, recipe_hash: str) -> CandidateRow | None:
        """The first complete candidate of the study with this recipe hash (a result cache), or None."""
        with self.db.session() as s:
            sid = study_id(s, study)
            first = s.execute(
                select(func.min(Candidate.number)).where(
                    Candidate.study_id == sid, Candidate.recipe_hash == recipe_hash, Candidate.state == "complete"
                )
            ).scalar()
            return None if first is None else candidate_rows(s, sid, Candidate.number == first)[0]

    def sample_scores(self, study: str, number: int) -> dict[str, list[float]]:
        """Per-example scores of a candidate, by objective ({} if none were recorded)."""
        with self.db.session() as s:
            c = find_candidate(s, study_id(s, study), study, number)
            rows = s.execute(
                select(SampleScores.objective, SampleScores.data)
                .where(SampleScores.candidate_id == c.id)
                .order_by(SampleScores.objective)
            ).all()
        return {obj: unpack(data) for obj, data in rows}

    def front(self, study: str) -> list[CandidateRow]:
        """Non-dominated complete candidates (under each objective's direction), in number order.

        Candidates missing a score for one of the study's objectives, or whose scores are estimates, are left
        out.
        """
        with self.db.session() as s:
            st = find_study(s, study)
            rows = candidate_rows(s, st.id, Candidate.state == "complete")
            names = [o["name"] for o in st.objectives]
            directions = [o["direction"] for o in st.objectives]
        rows = [r for r in rows if not r.estimated and all(n in r.scores for n in names)]
        if not rows:
            return []
        mask = non_dominated(to_minimization([[r.scores[n] for n in names] for r in rows], directions))
        return [r for r, keep in zip(rows, mask, strict=True) if keep]
