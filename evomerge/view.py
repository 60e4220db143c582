"""StudyView: what a study looks like, read from the store and never written to it.

The terminal progress, `evomerge status` / `front` and the web dashboard all read studies through this
one class. It keeps no state between calls beyond the store it reads: every method answers from the
store as it is now, in one or two queries, so a dashboard can build a view per request (or keep one)
and call it on every refresh while a search writes to the same database.

What the view computes it computes from stored rows only: the Pareto front with ``evomerge.front``, the
hypervolume against the reference point the run stored for the study (the run, not the view, fixes it:
a view that wrote it would race the run and make reading a write).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from evomerge import front as frontlib
from evomerge.store import CandidateRow, Store, StudyRow
from evomerge.store.leases import owner_is_dead_here


@dataclass(frozen=True)
class ObjectiveDirection:
    name: str
    direction: str  # "maximize" or "minimize"


@dataclass(frozen=True)
class StudySummary:
    """The figures a progress line or a dashboard header shows."""

    study: str
    state: str  # the stored status, or "interrupted" (see ``StudyView.state``)
    budget: int | None
    counts: dict[str, int]  # queued, running, complete, failed, total, attempts
    objectives: list[ObjectiveDirection]
    best: dict[str, float]  # per search objective, the best complete value (absent before any result)
    hypervolume: float | None  # None: fewer than two objectives, or no reference point stored yet
    reference_point: list[float] | None

    @property
    def done(self) -> int:
        return self.counts["complete"] + self.counts["failed"]


@dataclass(frozen=True)
class WorkerTimings:
    """Per worker: candidates it finished and its mean seconds per stage (``materialize_s``, ...)."""

    worker: str
    candidates: int
    mean_s: dict[str, float] = field(default_factory=dict)


def effective_state(status: str, lease_expires: datetime | None, now: datetime | None = None,
                    lease_owner: str | None = None) -> str:
    """A "running" study whose run is gone was interrupted (kill -9, a crash, a lost node): its lease
    lapsed, or its holder is a process of this host that no longer exists. Ctrl-C stores "paused"."""
    now = now or datetime.now(UTC)
    if status == "running" and (lease_expires is None or lease_expires < now or owner_is_dead_here(lease_owner)):
        return "interrupted"
    return status


class StudyView:
    """Read-only queries over the studies of one store; no method writes."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- studies --------------------------------------------------------------------------------
    def studies(self) -> list[dict[str, Any]]:
        """One dict per study (``Store.list_studies``' keys: study, state, budget, counts, objectives,
        created, updated, lease_owner, lease_expires), with ``state`` as ``effective_state`` says."""
        now = datetime.now(UTC)
        rows = self.store.list_studies()
        for r in rows:
            r["state"] = effective_state(r["state"], r.get("lease_expires"), now, r.get("lease_owner"))
        return rows

    def study(self, study: str) -> StudyRow:
        return self.store.get_study(study)

    def state(self, study: str) -> str:
        st = self.store.get_study(study)
        return effective_state(st.status, st.lease_expires, lease_owner=st.lease_owner)

    def events(self, study: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The study's run events (a node lost, workers back), oldest first, each as time, kind and
        message; with ``limit``, the newest ``limit`` of them."""
        return [e._asdict() for e in self.store.study_events(study, limit)]

    def objectives(self, study: str) -> list[ObjectiveDirection]:
        return [ObjectiveDirection(o["name"], o["direction"]) for o in self.store.get_study(study).objectives]

    def counts(self, study: str) -> dict[str, int]:
        return self.store.study_counts(study)

    # -- candidates -----------------------------------------------------------------------------
    def candidates(self, study: str, state: str | None = None) -> list[CandidateRow]:
        return self.store.candidates(study, state)

    def candidate(self, study: str, number: int) -> CandidateRow:
        return self.store.get_candidate(study, number)

    def sample_scores(self, study: str, number: int) -> dict[str, list[float]]:
        return self.store.sample_scores(study, number)

    def front(self, study: str) -> list[CandidateRow]:
        """Non-dominated complete candidates on the study's objectives, in number order; candidates
        missing a score of one of them are left out."""
        st = self.store.get_study(study)
        return _front(self.store.candidates(study, "complete"), _names(st), _directions(st))

    def best(self, study: str) -> dict[str, float]:
        st = self.store.get_study(study)
        return _best(_values(self.store.candidates(study, "complete"), _names(st)), st)

    def hypervolume(self, study: str) -> float | None:
        st = self.store.get_study(study)
        return _hypervolume(_values(self.store.candidates(study, "complete"), _names(st)), st)

    def summary(self, study: str) -> StudySummary:
        """Counts, best per objective and hypervolume in three queries."""
        st = self.store.get_study(study)
        counts = self.store.study_counts(study)
        F = _values(self.store.candidates(study, "complete"), _names(st))
        return StudySummary(
            study=study,
            state=effective_state(st.status, st.lease_expires, lease_owner=st.lease_owner),
            budget=st.budget,
            counts=counts,
            objectives=[ObjectiveDirection(o["name"], o["direction"]) for o in st.objectives],
            best=_best(F, st),
            hypervolume=_hypervolume(F, st),
            reference_point=st.reference_point,
        )

    def worker_timings(self, study: str) -> list[WorkerTimings]:
        """Mean stage seconds per worker over its complete candidates (cache hits left out)."""
        per: dict[str, list[dict[str, Any]]] = {}
        for c in self.store.candidates(study, "complete"):
            if c.worker is None or not c.timings or "cached_from" in c.timings:
                continue
            per.setdefault(c.worker, []).append(c.timings)
        out = []
        for worker, timings in sorted(per.items()):
            keys = sorted({k for t in timings for k, v in t.items() if k.endswith("_s") and _is_num(v)})
            means = {k: float(np.mean([t[k] for t in timings if _is_num(t.get(k))])) for k in keys}
            out.append(WorkerTimings(worker, len(timings), means))
        return out

    def hypervolume_series(self, study: str) -> list[dict[str, Any]]:
        """The hypervolume after each finished evaluation, as the run stored it (evaluations, complete,
        value, recorded); empty before the study has a reference point or with one objective."""
        return self.store.hypervolume_series(study)

    def hypervolume_changes(self, study: str) -> list[dict[str, Any]]:
        """The points of the series where the hypervolume changed, and the last: its step curve."""
        return self.store.hypervolume_changes(study)

    def last_hypervolume(self, study: str) -> dict[str, Any] | None:
        """The newest point of the series (None before the first)."""
        return self.store.last_hypervolume(study)

    def table(self, study: str) -> tuple[list[tuple], dict[int, dict[str, float]]]:
        """Every candidate without its genome and recipe (``evomerge.store.series.TABLE_COLUMNS``) and
        the scores by number: what a page of the whole study needs, in two queries."""
        return self.store.study_table(study)

    def columns(self, study: str) -> dict[str, Any]:
        """Every candidate column by column, times as seconds since 1970 and the scores as one list per
        name (``evomerge.store.series.SeriesMethods.study_columns``): the whole-study read of a page."""
        return self.store.study_columns(study)

    def best_scores(self, study: str) -> dict[str, tuple[float, float]]:
        """Per score name, (lowest, highest) over the complete candidates: one aggregate query."""
        return self.store.best_scores(study)

    def lineage(self, study: str, number: int) -> tuple[list[int], list[int]]:
        """The candidate's parents and children, as candidate numbers (the run stores parents as the
        algorithm's proposal keys; the store maps them)."""
        return self.store.lineage(study, number)

    def stamp(self, study: str) -> dict[str, Any]:
        """A small dict that changes whenever the study changes (a dashboard polls it)."""
        return self.store.study_stamp(study)


def _names(st: StudyRow) -> list[str]:
    return [o["name"] for o in st.objectives]


def _directions(st: StudyRow) -> list[str]:
    return [o["direction"] for o in st.objectives]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _values(rows: list[CandidateRow], names: list[str]) -> np.ndarray:
    """Objective values of the rows that have all of them, in the objectives' order."""
    vals = [[r.scores[n] for n in names] for r in rows if not r.estimated and all(n in r.scores for n in names)]
    return np.array(vals, dtype=float).reshape(-1, len(names))


def _front(rows: list[CandidateRow], names: list[str], directions: list[str]) -> list[CandidateRow]:
    rows = [r for r in rows if not r.estimated and all(n in r.scores for n in names)]
    if not rows:
        return []
    mask = frontlib.non_dominated(frontlib.to_minimization(_values(rows, names), directions))
    return [r for r, keep in zip(rows, mask, strict=True) if keep]


def _best(F: np.ndarray, st: StudyRow) -> dict[str, float]:
    if len(F) == 0:
        return {}
    return {n: float(F[:, j].max() if d == "maximize" else F[:, j].min())
            for j, (n, d) in enumerate(zip(_names(st), _directions(st), strict=True))}


def _hypervolume(F: np.ndarray, st: StudyRow) -> float | None:
    if len(st.objectives) < 2 or st.reference_point is None:
        return None
    if len(F) == 0:
        return 0.0
    return frontlib.hypervolume(frontlib.to_minimization(F, _directions(st)), st.reference_point)
