"""The study's hypervolume series, recorded by the run as candidates finish.

One point per finished candidate (complete or failed, in the order they finished): how many had
finished, how many of those were complete, the hypervolume of the complete ones against the study's
fixed reference point, and when the candidate finished. The front is kept here incrementally, so a
point costs a hypervolume of the front only when the front changed. Points already stored are never
written again: a resumed run, or one on a database from before the series existed, fills in what is
missing from the finished candidates in the store.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from evomerge import front as frontlib
from evomerge.store import Store
from evomerge.store.series import TABLE_COLUMNS

_NUMBER, _STATE, _FINISHED, _ESTIMATED = (TABLE_COLUMNS.index(c) for c in ("number", "state", "finished", "estimated"))
_EPOCH = datetime.min.replace(tzinfo=UTC)


class HypervolumeSeries:
    def __init__(self, store: Store, study: str, names: list[str], directions: list[str]) -> None:
        self.store = store
        self.study = study
        self.names = names
        self.directions = directions
        self._seen: set[int] = set()
        self._all_seen_to = 0  # every candidate up to this number is in _seen: later reads start above it
        self._front = np.zeros((0, len(names)))
        self._hv = 0.0
        self._complete = 0
        self._stored: int | None = None  # evaluations already in the store, read once

    def update(self) -> None:
        """Record a point for every candidate finished since the last update (nothing before the study
        has a reference point, or with fewer than two objectives)."""
        if len(self.names) < 2:
            return
        ref = self.store.get_study(self.study).reference_point
        if ref is None:
            return
        if self._stored is None:
            self._stored = self.store.last_hypervolume_evaluations(self.study)
        # Only what may be new: a read of the whole study on every turn grew with the study.
        table, scores = self.store.study_table(self.study, after=self._all_seen_to)
        done = [r for r in table if r[_STATE] in ("complete", "failed") and r[_NUMBER] not in self._seen]
        done.sort(key=lambda r: (r[_FINISHED] or _EPOCH, r[_NUMBER]))
        points = []
        for r in done:
            self._seen.add(r[_NUMBER])
            s = scores.get(r[_NUMBER], {})
            if r[_STATE] == "complete" and not r[_ESTIMATED] and all(n in s for n in self.names):
                self._complete += 1
                self._add(frontlib.to_minimization(np.array([[s[n] for n in self.names]]), self.directions), ref)
            if len(self._seen) > self._stored:
                points.append((len(self._seen), self._complete, self._hv, r[_FINISHED]))
        while self._all_seen_to + 1 in self._seen:
            self._all_seen_to += 1
        self.store.add_hypervolume_points(self.study, points)

    def _add(self, f: np.ndarray, ref: list[float]) -> None:
        """Put one point (minimisation form) into the front; the hypervolume changes only if it joins."""
        if not np.all(np.isfinite(f)):
            return
        F = self._front
        if len(F) and np.any(np.all(F <= f, axis=1)):
            return  # dominated by, or equal to, a point of the front
        keep = ~(np.all(f <= F, axis=1) & np.any(f < F, axis=1)) if len(F) else np.zeros(0, dtype=bool)
        self._front = np.vstack([F[keep], f])
        self._hv = frontlib.hypervolume(self._front, ref, front=True)
