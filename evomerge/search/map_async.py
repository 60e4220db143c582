"""Asynchronous MAP: the surrogate's front handed out while earlier points are still being evaluated.

:class:`~evomerge.search.map.MAP` waits at every phase: the design's last point, then each front
round's, before it fits again; on a cluster every other worker idles meanwhile (on a simulated pool of
64 workers, 9 in 10 worker-seconds). ``map_async`` keeps MAP's surrogates, design and NSGA-II on them,
and drops the barriers:

* **design**: MAP's ``n_design`` points first; while fewer than ``2 dim + 2`` results are back (too few
  to fit even a diagonal quadratic) a worker that frees up gets a uniform sample instead (seeded by its
  key): more design, not a wait. Until the full quadratic is determined (``terms + 1`` results) the
  fits are diagonal ones (``2 dim + 1`` terms, recorded as ``variant`` in the fit);
* **front**: once enough results are in, fit (on every result so far, in key order, so the fit does
  not depend on the order results came in), run NSGA-II on the surrogates and keep its predicted front
  as a pool; each asked point is the pool's point farthest (in predicted objective space, normalised)
  from those already in flight, whose values are believed to be the surrogate's predictions (a
  *kriging believer* fantasy: a point in flight already covers its part of the front, so the next one
  goes elsewhere). The surrogate is refitted after every ``n_front`` results (MAP's round size), and
  NSGA-II is run again (another seed) when the pool runs dry first. A point evaluated or in flight
  already gets MAP's small jitter.

``front_rounds`` bounds the number of fits (nested MAP's pair steps use 1); a bounded run fits only once
its whole design is back, as MAP does, and hands ``n_front`` points per fit. ``bayesian`` (adaptive
rounds) is MAP's generational mode only.

State (plain data, exact resume): told points, the points in flight, the fits (with the keys and
predictions of the points each produced, as MAP's state has them for the dashboard), the pool, the
counters. Randomness comes from generators seeded by (seed, key) or (seed, fit, pool round).

:class:`NestedMAPAsync` (``map_nested_async``) is nested MAP with these steps. Its steps still follow
one another (a pair's merge is chosen from its evaluated points before the next pair starts), and every
step but the last is bounded (one front round, fitted on its whole design), so with more than two
sources a study still waits for each of the first ``n_sources - 2`` steps' results; the last step, where
the study spends most of its budget, and a study of two sources (one step) wait for nothing.
"""

from __future__ import annotations

import bisect
import copy
from typing import Any, ClassVar

import numpy as np

from evomerge.search.base import Proposal, register
from evomerge.search.map import MAP
from evomerge.search.map_nested import NestedMAP


@register
class MAPAsync(MAP):
    name = "map_async"
    generational = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.settings["bayesian"]:
            raise ValueError("map_async: bayesian (adaptive) rounds wait for each round; use map for them")
        self._design_cache: np.ndarray | None = None

    def _reset(self) -> None:
        super()._reset()
        self._pending: dict[int, list[float]] = {}
        self._design_handed = 0
        self._told_since_fit = 0
        self._handed_since_fit = 0
        self._pool: list[list[float]] = []
        self._pool_round = 0

    # ------------------------------------------------------------------ helpers
    def _design(self) -> np.ndarray:
        if self._design_cache is None:
            g, self._generation = self._generation, 0
            try:
                self._design_cache = self._design_points()  # seeded by generation 0, as MAP's
            finally:
                self._generation = g
        return self._design_cache

    def _bounded(self) -> bool:
        return self.settings["front_rounds"] is not None

    def _min_fit(self) -> int:
        # unbounded: a diagonal quadratic (2T + 1 terms) as soon as it is determined, the study's own
        # once that is (see _refit)
        return self.n_design if self._bounded() else min(self.n_design, 2 * self.dim + 2)

    def _n_ok(self) -> int:
        return sum(1 for p in self._points if p["values"] is not None)

    def _round_fit(self) -> dict[str, Any] | None:
        """This round's fit (None while every result so far failed)."""
        return self._fits[-1] if self._fits and self._fits[-1]["generation"] == self._generation else None

    def _refit(self) -> None:
        self._generation += 1
        early = self.variant == "full" and self._n_ok() < self.n_terms + 1
        fit = self._fit("diagonal" if early and not self._bounded() else None)
        if fit is not None:
            fit.update({"predicted_front": [], "keys": []})
            self._fits.append(fit)
        self._told_since_fit = 0
        self._handed_since_fit = 0
        self._pool_round = 0
        self._fill_pool()

    def _fill_pool(self) -> None:
        fit = self._round_fit()
        self._pool_round += 1
        if fit is None:  # nothing succeeded yet: random points, as MAP's front round then gives
            rng = np.random.default_rng([self.seed % (2**63), self._generation, self._pool_round, 13])
            self._pool = [[float(v) for v in x] for x in rng.random((int(self.settings["n_front"]), self.dim))]
            return
        X, _ = self._run_nsga(fit, salt=self._pool_round - 1)
        keep: list[np.ndarray] = []
        for x in X:  # NSGA-II's front holds near-duplicates
            if all(np.max(np.abs(x - k)) > 1e-6 for k in keep):
                keep.append(x)
        self._pool = [[float(v) for v in x] for x in keep]

    def _pick(self, key: int) -> list[float]:
        """The pool's point farthest from the points in flight (at their predicted values)."""
        fit = self._round_fit()
        if fit is None:
            return self._pool.pop()
        P = np.array(self._pool, dtype=float)
        F = self.predict(P, fit) * self._signs
        if self._pending:
            G = self.predict(np.array(list(self._pending.values()), dtype=float), fit) * self._signs
            both = np.vstack([F, G])
            lo, hi = both.min(axis=0), both.max(axis=0)
            scale = np.where(hi - lo > 1e-12, hi - lo, 1.0)
            d = np.min(np.linalg.norm((F - lo)[:, None, :] / scale - (G - lo)[None, :, :] / scale, axis=2), axis=1)
            i = int(np.argmax(d))
        else:  # nothing in flight: an extreme, as MAP's spread starts
            i = int(np.argmin(F[:, self._handed_since_fit % self.n_obj]))
        x = np.array(self._pool.pop(i))
        seen = [p["x"] for p in self._points] + list(self._pending.values())
        if seen and np.min(np.max(np.abs(np.array(seen) - x), axis=1)) < 1e-9:
            rng = np.random.default_rng([self.seed % (2**63), key, 3])
            x = np.clip(x + 0.01 * rng.standard_normal(self.dim), 0.0, 1.0)
        return [float(v) for v in x]

    def _next_x(self, key: int) -> tuple[list[float], int] | None:
        """The next point to hand out and its generation, or None to wait for results."""
        if self._design_handed < self.n_design:
            self._design_handed += 1
            return [float(v) for v in self._design()[self._design_handed - 1]], 0
        fr = self.settings["front_rounds"]
        n_front = int(self.settings["n_front"])
        if self._generation == 0:
            if self._bounded() and len(self._points) < self.n_design:
                return None  # a bounded run fits once its whole design is back, as MAP does
            if not self._bounded() and self._n_ok() < self._min_fit():
                rng = np.random.default_rng([self.seed % (2**63), key, 11])
                return [float(v) for v in rng.random(self.dim)], 0  # more design instead of a wait
            self._refit()
        elif self._told_since_fit >= n_front and (fr is None or self._generation < int(fr)):
            if self._bounded() and self._pending:
                return None  # a bounded round fits on the previous round's results, as MAP's does
            self._refit()
        if self._bounded() and self._handed_since_fit >= n_front:
            return None
        if not self._pool:
            self._fill_pool()
        if self._pool:
            x = self._pick(key)
        else:  # the surrogates' front holds nothing new: a uniform sample
            x = [float(v) for v in np.random.default_rng([self.seed % (2**63), key, 12]).random(self.dim)]
        fit = self._round_fit()
        if fit is not None:
            fit["keys"].append(key)
            fit["predicted_front"].append([float(v) for v in self.predict(np.array([x]), fit)[0]])
        self._handed_since_fit += 1
        return x, self._generation

    # ------------------------------------------------------------------ interface
    def done(self) -> bool:
        me = self.settings["max_evals"]
        if me is not None and self._next_key >= int(me):
            return True
        fr = self.settings["front_rounds"]
        return (fr is not None and self._generation >= int(fr)
                and self._handed_since_fit >= int(self.settings["n_front"]))

    def ask(self, n: int) -> list[Proposal]:
        out: list[Proposal] = []
        while len(out) < int(n) and not self.done():
            key = self._next_key
            nxt = self._next_x(key)
            if nxt is None:
                break
            x, gen = nxt
            self._next_key += 1
            self._pending[key] = x
            out.append(Proposal(key=key, x=list(x), parents=[], generation=gen))
        return out

    def tell(self, results: list[tuple[int, list[float] | None]]) -> None:
        for key, values in results:
            key = int(key)
            if key not in self._pending:
                continue
            fmin = self.to_min(values)
            x = self._pending.pop(key)
            point = {"key": key, "x": x, "values": None if fmin is None else [float(v) for v in values]}  # type: ignore[union-attr]
            bisect.insort(self._points, point, key=lambda p: p["key"])  # the fit reads them in key order
            self._told_since_fit += 1

    @property
    def outstanding(self) -> list[int]:
        return sorted(self._pending)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**self._header(), "variant": self.variant, "next_key": self._next_key,
                "generation": self._generation, "phase": self.phase(), "points": copy.deepcopy(self._points),
                "fits": copy.deepcopy(self._fits), "pending": [[k, x] for k, x in sorted(self._pending.items())],
                "design_handed": self._design_handed, "told_since_fit": self._told_since_fit,
                "handed_since_fit": self._handed_since_fit, "pool": self._pool, "pool_round": self._pool_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_points(state)
        self._fits = copy.deepcopy(state["fits"])
        self._pending = {int(k): [float(v) for v in x] for k, x in state["pending"]}
        self._design_handed = int(state["design_handed"])
        self._told_since_fit = int(state["told_since_fit"])
        self._handed_since_fit = int(state["handed_since_fit"])
        self._pool = [[float(v) for v in x] for x in state["pool"]]
        self._pool_round = int(state["pool_round"])


@register
class NestedMAPAsync(NestedMAP):
    name = "map_nested_async"
    # A pair step's merge is chosen from its results before the next pair starts: with more than two
    # sources, ask waits at each step's end (with two, the one step is map_async's, with no wait).
    generational = True
    map_class: ClassVar[type[MAP]] = MAPAsync
