"""Steady-state NSGA-III: NSGA-III without a generation barrier, as ``nsga2_steady`` is NSGA-II's.

Children are bred as :mod:`~evomerge.search.nsga2_steady` breeds them (binary tournaments on rank and
crowding, SBX, polynomial mutation, each from a generator seeded by ``(seed, key)``), and each result
joins the population at once; when the population exceeds ``pop_size``, one member of the last
non-dominated front goes (failures first). NSGA-III chooses in the last front by *reference
directions* instead of crowding distance (Deb and Jain 2014), which keeps three or more objectives
spread: objectives are normalised by the feasible members' ideal and worst points, every member is
associated with the Das-Dennis direction nearest to it (perpendicular distance), and the member that
goes is, within the last front, one of the direction holding the most members of the whole
population, the farthest from that direction (among equals, the newest). ``pop_size`` and
``n_partitions`` default as in :mod:`~evomerge.search.nsga3`.

State: ``nsga2_steady``'s (the directions are recomputed from the settings).
"""

from __future__ import annotations

import numpy as np

from evomerge.search.base import register
from evomerge.search.nsga2_steady import SteadyNSGA2
from evomerge.search.nsga3 import reference_directions


@register
class SteadyNSGA3(SteadyNSGA2):
    name = "nsga3_steady"
    default_settings = {
        **SteadyNSGA2.default_settings,
        "pop_size": None,  # None: the number of reference directions, rounded up to a multiple of 4
        "n_partitions": None,  # Das-Dennis partitions; None: as nsga3
    }

    def _pop_size(self) -> int:
        self._dirs = reference_directions(self.n_obj, self.settings["n_partitions"])
        p = self.settings["pop_size"]
        return int(4 * -(-len(self._dirs) // 4)) if p is None else int(p)

    def _drop_worst(self) -> None:
        scores = self._scores()
        assert scores is not None
        rank, _ = scores
        last = np.flatnonzero(rank == rank.max())
        failed = [k for k in last if self._pop[k]["f"] is None]
        if failed:
            self._pop.pop(int(max(failed, key=lambda k: self._pop[k]["key"])))
            return
        ok = [k for k in range(len(self._pop)) if self._pop[k]["f"] is not None]
        F = np.array([self._pop[k]["f"] for k in ok], dtype=float)
        lo, hi = F.min(axis=0), F.max(axis=0)
        N = (F - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
        W = self._dirs / np.linalg.norm(self._dirs, axis=1, keepdims=True)
        proj = N @ W.T  # (members, directions): length along each direction
        perp = np.sqrt(np.maximum(np.sum(N * N, axis=1, keepdims=True) - proj**2, 0.0))
        niche = np.argmin(perp, axis=1)
        count = np.bincount(niche, minlength=len(W))
        row = {k: i for i, k in enumerate(ok)}

        def badness(k: int) -> tuple[int, float, int]:
            i = row[k]
            return (int(count[niche[i]]), float(perp[i, niche[i]]), self._pop[k]["key"])

        self._pop.pop(int(max(last, key=badness)))
