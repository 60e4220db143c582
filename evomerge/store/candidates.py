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
from sqlalchemy import bindparam, case, delete, func, insert, select, update
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


def _candidate_values(p: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of a proposed candidate from ``add_candidate``'s arguments, checked."""
    key = str(p["proposal_key"])
    if not key or len(key) > 255:
        raise ValueError(f"proposal_key must be a non-empty string of at most 255 characters, got {key!r}")
    genome = json_strict(p["genome"], "genome")
    recipe_json = p["recipe_json"]
    if hasattr(recipe_json, "canonical_json"):
        recipe_json = recipe_json.canonical_json()
    elif not isinstance(recipe_json, str):
        recipe_json = json.dumps(json_strict(recipe_json, "recipe"), sort_keys=True, separators=(",", ":"))
    return {"proposal_key": key, "genome": genome, "recipe_json": recipe_json,
            "recipe_hash": str(p["recipe_hash"]), "parents": [int(v) for v in p.get("parents", ())],
            "generation": int(p.get("generation", 0)), "operator": p.get("operator"),
            "niche": json_strict(p.get("niche"), "niche")}


def _add_one(s: Session, sid: int, study: str, r: dict[str, Any]) -> int:
    """Insert one checked candidate (``_candidate_values``) under a free number, or find it by its key."""
    for _ in range(10):
        existing = _by_key(s, sid, r["proposal_key"])
        if existing is not None:
            return existing[0]
        last = s.execute(select(func.max(Candidate.number)).where(Candidate.study_id == sid)).scalar()
        number = (last or 0) + 1
        try:
            with s.begin_nested():
                s.add(Candidate(study_id=sid, number=number, state="queued", attempts=0, created=now(), **r))
            return number
        except IntegrityError:  # a concurrent writer took the number or the key
            continue
    raise StoreError(f"study {study}: could not allocate a candidate number (too much contention)")


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
        return self.add_candidates(study, [{
            "proposal_key": proposal_key, "genome": genome, "recipe_json": recipe_json,
            "recipe_hash": recipe_hash, "parents": parents, "generation": generation, "operator": operator,
            "niche": niche}])[0][0]

    def add_candidates(self, study: str, proposals: Sequence[Mapping[str, Any]]) -> list[tuple[int, bool]]:
        """``add_candidate`` for many proposals (mappings of its arguments) in one transaction and a few
        statements: (number, whether it is new) per proposal, in order."""
        rows = [_candidate_values(p) for p in proposals]
        if not rows:
            return []
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            known: dict[str, tuple[int, str]] = {}
            keys = [r["proposal_key"] for r in rows]
            for i in range(0, len(keys), 500):
                q = select(Candidate.proposal_key, Candidate.number, Candidate.recipe_hash).where(
                    Candidate.study_id == sid, Candidate.proposal_key.in_(keys[i: i + 500]))
                known.update((k, (n, h)) for k, n, h in s.execute(q))
            out: list[tuple[int, bool]] = []
            fresh: list[dict[str, Any]] = []
            last = None
            for r in rows:
                key = r["proposal_key"]
                if key in known:
                    number, h = known[key]
                    if h != r["recipe_hash"]:
                        log.warning(
                            "study %s: proposal %r was recorded with recipe %s, now proposed with %s; "
                            "keeping candidate %d as recorded",
                            study, key, h, r["recipe_hash"], number,
                        )
                    out.append((number, False))
                    continue
                if last is None:
                    last = s.execute(select(func.max(Candidate.number)).where(Candidate.study_id == sid)).scalar() or 0
                last += 1
                fresh.append({**r, "study_id": sid, "number": last, "state": "queued", "attempts": 0,
                              "created": now()})
                known[key] = (last, r["recipe_hash"])
                out.append((last, True))
            if fresh:
                try:
                    with s.begin_nested():  # a savepoint: a clash leaves the transaction usable
                        s.execute(insert(Candidate.__table__), fresh)
                except IntegrityError:  # a concurrent writer took a number or a key: one at a time
                    out = [(_add_one(s, sid, study, r), new) for r, (_, new) in zip(rows, out, strict=True)]
        return out

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

    def mark_running_many(self, study: str, jobs: Sequence[tuple[int, str | None]]) -> None:
        """``mark_running`` for many (number, worker) pairs, as one statement run for each pair."""
        if not jobs:
            return
        t = now()
        c = Candidate.__table__.c
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            for i in range(0, len(jobs), 500):
                # one statement (an executemany was one per row on the server: a second per 512 on a busy one)
                part = {int(n): w for n, w in jobs[i: i + 500]}
                s.execute(
                    update(Candidate.__table__)
                    .where(c.study_id == sid, c.number.in_(list(part)), c.state.in_(_ACTIVE))
                    .values(state="running", worker=case(part, value=c.number), started=t, heartbeat=t)
                )

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

    def complete_candidates(
        self,
        study: str,
        results: Sequence[tuple[int, Mapping[str, float], Mapping[str, Sequence[float]] | None,
                                Mapping[str, Any] | None]],
        attempt: bool = False,
    ) -> list[Literal["complete", "failed"] | None]:
        """``complete_candidate`` for many (number, scores, sample_scores, timings) in one transaction and
        a few statements; the states it would return, in order (a number given twice: the second is a
        duplicate, None)."""
        prepared = []
        for number, scores, sample_scores, timings in results:
            clean, samples, bad = clean_scores(scores, sample_scores)
            if not clean and bad is None:
                bad = "no scores returned"
            prepared.append((int(number), clean, samples, bad, clean_timings(timings)))
        if not prepared:
            return []
        t = now()
        cols = Candidate.__table__.c
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            nums = sorted({p[0] for p in prepared})
            found: dict[int, tuple[int, str, int, Any]] = {}
            for i in range(0, len(nums), 500):
                q = (select(Candidate.number, Candidate.id, Candidate.state, Candidate.attempts, Candidate.timings)
                     .where(Candidate.study_id == sid, Candidate.number.in_(nums[i: i + 500]))
                     .order_by(Candidate.number)
                     .with_for_update())
                found.update((n, (cid, st, a, tim)) for n, cid, st, a, tim in s.execute(q))
            out: list[Literal["complete", "failed"] | None] = []
            updates, score_rows, sample_rows = [], [], []
            for number, clean, samples, bad, tim in prepared:
                if number not in found:
                    raise CandidateNotFound(study, number)
                cid, state, attempts, old_tim = found[number]
                if state in _TERMINAL:
                    out.append(None)
                    continue
                attempts = int(attempts) + (1 if attempt else 0)
                state = "failed" if bad is not None else "complete"
                found[number] = (cid, state, attempts, old_tim)
                updates.append({"b_id": cid, "b_state": state, "b_error": bad, "b_attempts": attempts,
                                "b_timings": tim if tim is not None else old_tim})
                out.append(state)
                if bad is None:
                    score_rows += [{"candidate_id": cid, "objective": k, "value": v} for k, v in clean.items()]
                    sample_rows += [{"candidate_id": cid, "objective": k, "count": int(a.size), "data": pack(a)}
                                    for k, a in samples.items()]
            if updates:
                s.execute(
                    update(Candidate.__table__).where(cols.id == bindparam("b_id"))
                    .values(state=bindparam("b_state"), error=bindparam("b_error"), attempts=bindparam("b_attempts"),
                            timings=bindparam("b_timings", type_=cols.timings.type), finished=t, heartbeat=t),
                    updates,
                )
            # Only complete candidates hold scores, and they never get here: nothing old to clear.
            if score_rows:
                s.execute(insert(Score.__table__), score_rows)
            if sample_rows:
                s.execute(insert(SampleScores.__table__), sample_rows)
        return out

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

    def get_candidates(self, study: str, numbers: Sequence[int]) -> list[CandidateRow]:
        """The candidates of these numbers that exist, in number order, with their scores."""
        nums = sorted({int(n) for n in numbers})
        out: list[CandidateRow] = []
        with self.db.session() as s:
            sid = study_id(s, study)
            for i in range(0, len(nums), 500):
                out += candidate_rows(s, sid, Candidate.number.in_(nums[i: i + 500]))
        return out

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

    def complete_by_hash(self, study: str, recipe_hashes: Sequence[str]) -> dict[str, int]:
        """``find_by_hash`` for many hashes in one query: hash -> number of its first complete candidate."""
        hashes = sorted(set(recipe_hashes))
        out: dict[str, int] = {}
        if not hashes:
            return out
        with self.db.session() as s:
            sid = study_id(s, study)
            for i in range(0, len(hashes), 500):
                q = (select(Candidate.recipe_hash, func.min(Candidate.number))
                     .where(Candidate.study_id == sid, Candidate.recipe_hash.in_(hashes[i: i + 500]),
                            Candidate.state == "complete")
                     .group_by(Candidate.recipe_hash))
                out.update((h, int(n)) for h, n in s.execute(q))
        return out

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

    def sample_scores_many(self, study: str, numbers: Sequence[int]) -> dict[int, dict[str, list[float]]]:
        """``sample_scores`` of many candidates in one query: number -> objective -> scores."""
        nums = sorted({int(n) for n in numbers})
        out: dict[int, dict[str, list[float]]] = {}
        with self.db.session() as s:
            sid = study_id(s, study)
            for i in range(0, len(nums), 500):
                q = (select(Candidate.number, SampleScores.objective, SampleScores.data)
                     .join(Candidate, Candidate.id == SampleScores.candidate_id)
                     .where(Candidate.study_id == sid, Candidate.number.in_(nums[i: i + 500]))
                     .order_by(Candidate.number, SampleScores.objective))
                for number, obj, data in s.execute(q):
                    out.setdefault(int(number), {})[obj] = unpack(data)
        return out

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
