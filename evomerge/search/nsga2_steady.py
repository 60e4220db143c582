"""Steady-state NSGA-II: NSGA-II without a generation barrier, so no worker waits for the slowest member
of a generation.

Each ``ask`` breeds children from the population as it is at that moment (binary tournaments on rank
and crowding distance, SBX crossover, polynomial mutation: pymoo's NSGA-II operators and defaults);
each ``tell`` inserts one result and, once the population exceeds ``pop_size``, drops the worst member
((mu + 1) survival: the last non-dominated front's most crowded member, failures first). Until
``pop_size`` results are back the proposals are uniform samples, as NSGA-II's first generation is.
With W workers about W children are in flight at once, bred from a population a few results old:
Durillo et al. (2009) found steady-state NSGA-II converges at least as fast per evaluation.

State (plain data, exact resume): the population (key, genotype, values in minimisation form), the
proposals handed out and not told, the next key. Each proposal's randomness comes from a generator
seeded by ``(seed, key)``, so there is no RNG state to carry. Results are order-dependent by nature (a
result told earlier changes the parents of later children); the driver tells the results of each wait
in candidate order and saves the state with them, so a resumed run continues the one that was
interrupted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.search.base import Algorithm, Proposal, register


def ranks_and_crowding(F: np.ndarray, feasible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-domination rank (0 = first front; infeasible rows rank after every feasible one, among
    themselves by nothing) and crowding distance within each front (inf at a front's extremes)."""
    n = len(F)
    rank = np.full(n, -1, dtype=int)
    crowd = np.zeros(n)
    idx = np.flatnonzero(feasible)
    if len(idx):
        G = F[idx]
        # objective by objective on 2-D arrays: the (n, n, m) comparisons and their reductions were most
        # of a tell's time at a population of hundreds
        le = np.ones((len(idx), len(idx)), dtype=bool)
        lt = np.zeros((len(idx), len(idx)), dtype=bool)
        for m in range(G.shape[1]):
            col = G[:, m]
            le &= col[:, None] <= col[None, :]
            lt |= col[:, None] < col[None, :]
        dom = le & lt  # dom[i, j]: i dominates j
        count = dom.sum(axis=0)
        r, left = 0, np.ones(len(idx), dtype=bool)
        while left.any():
            front = left & (count == 0)
            rank[idx[front]] = r
            count = count - dom[front].sum(axis=0)
            left &= ~front
            r += 1
            members = idx[front]
            if len(members) <= 2:
                crowd[members] = np.inf
                continue
            Fm = F[members]
            d = np.zeros(len(members))
            for m in range(F.shape[1]):
                order = np.argsort(Fm[:, m], kind="stable")
                span = Fm[order[-1], m] - Fm[order[0], m]
                d[order[0]] = d[order[-1]] = np.inf
                if span > 0:
                    d[order[1:-1]] += (Fm[order[2:], m] - Fm[order[:-2], m]) / span
            crowd[members] = d
        worst = r
    else:
        worst = 0
    rank[~feasible] = worst
    return rank, crowd


def sbx(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, eta: float, prob: float) -> np.ndarray:
    """One child of simulated binary crossover on [0, 1] (per gene with probability 0.5, as pymoo)."""
    child = a.copy()
    if rng.random() >= prob:
        return child
    u = rng.random(len(a))
    beta = np.where(u <= 0.5, (2 * u) ** (1 / (eta + 1)), (1 / (2 * (1 - u))) ** (1 / (eta + 1)))
    c1 = 0.5 * ((1 + beta) * a + (1 - beta) * b)
    c2 = 0.5 * ((1 - beta) * a + (1 + beta) * b)
    pick = rng.random(len(a)) < 0.5
    swap = rng.random(len(a)) < 0.5
    child = np.where(pick, np.where(swap, c2, c1), a)
    return np.clip(child, 0.0, 1.0)


def polynomial_mutation(x: np.ndarray, rng: np.random.Generator, eta: float, prob: float) -> np.ndarray:
    y = x.copy()
    for i in np.flatnonzero(rng.random(len(x)) < prob):
        u = rng.random()
        if u < 0.5:
            delta = (2 * u + (1 - 2 * u) * (1 - y[i]) ** (eta + 1)) ** (1 / (eta + 1)) - 1
        else:
            delta = 1 - (2 * (1 - u) + 2 * (u - 0.5) * y[i] ** (eta + 1)) ** (1 / (eta + 1))
        y[i] = y[i] + delta
    return np.clip(y, 0.0, 1.0)


@register
class SteadyNSGA2(Algorithm):
    name = "nsga2_steady"
    generational = False
    default_settings = {
        "pop_size": 16,
        "eta_crossover": 15.0,
        "prob_crossover": 0.9,
        "eta_mutation": 20.0,
        "prob_mutation": None,  # None: 1 / dim per gene
        "max_evals": None,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pop_size = self._pop_size()
        if self.pop_size < 2:
            raise ValueError(f"{self.name}: pop_size must be >= 2")
        pm = self.settings["prob_mutation"]
        self.prob_mutation = 1.0 / self.dim if pm is None else float(pm)
        self._next_key = 0
        self._pop: list[dict[str, Any]] = []  # {"key", "x", "f" (minimisation form) or None}
        self._pending: dict[int, dict[str, Any]] = {}  # key -> {"x", "parents"}

    def _pop_size(self) -> int:
        return int(self.settings["pop_size"])

    def done(self) -> bool:
        me = self.settings["max_evals"]
        return me is not None and self._next_key >= int(me)

    def _tournament(self, rng: np.random.Generator, rank: np.ndarray, crowd: np.ndarray) -> int:
        i, j = rng.integers(len(self._pop), size=2)
        if rank[i] != rank[j]:
            return int(i if rank[i] < rank[j] else j)
        return int(i if crowd[i] >= crowd[j] else j)

    def _child(self, key: int, scores: tuple[np.ndarray, np.ndarray] | None) -> Proposal:
        rng = np.random.default_rng([self.seed % (2**63), key])
        if key < self.pop_size or len(self._pop) < 2 or scores is None:
            return Proposal(key=key, x=[float(v) for v in rng.random(self.dim)], parents=[], generation=0)
        rank, crowd = scores
        a, b = self._tournament(rng, rank, crowd), self._tournament(rng, rank, crowd)
        xa, xb = np.asarray(self._pop[a]["x"]), np.asarray(self._pop[b]["x"])
        x = sbx(xa, xb, rng, float(self.settings["eta_crossover"]), float(self.settings["prob_crossover"]))
        x = polynomial_mutation(x, rng, float(self.settings["eta_mutation"]), self.prob_mutation)
        gen = 1 + key // self.pop_size  # a generation's worth of children: for lineage displays only
        return Proposal(key=key, x=[float(v) for v in x], parents=[self._pop[a]["key"], self._pop[b]["key"]],
                        generation=gen)

    def _scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        if len(self._pop) < 2:
            return None
        feasible = np.array([m["f"] is not None for m in self._pop])
        F = np.array([m["f"] if m["f"] is not None else [0.0] * self.n_obj for m in self._pop], dtype=float)
        return ranks_and_crowding(F, feasible)

    def ask(self, n: int) -> list[Proposal]:
        out: list[Proposal] = []
        scores = self._scores()
        while len(out) < int(n) and not self.done():
            p = self._child(self._next_key, scores)
            self._next_key += 1
            self._pending[p.key] = {"x": p.x, "parents": p.parents, "generation": p.generation}
            out.append(p)
        return out

    def tell(self, results: list[tuple[int, list[float] | None]]) -> None:
        for key, values in results:
            p = self._pending.pop(int(key), None)
            if p is None:
                continue
            f = self.to_min(values)
            self._pop.append({"key": int(key), "x": p["x"], "f": None if f is None else [float(v) for v in f]})
            if len(self._pop) > self.pop_size:
                self._drop_worst()

    def _drop_worst(self) -> None:
        scores = self._scores()
        assert scores is not None
        rank, crowd = scores
        worst = rank.max()
        cand = np.flatnonzero(rank == worst)
        # the most crowded of the last front; among equals the newest goes (the population stays put)
        i = max(cand, key=lambda k: (-crowd[k], self._pop[k]["key"]))
        self._pop.pop(int(i))

    @property
    def outstanding(self) -> list[int]:
        return sorted(self._pending)

    @property
    def population(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self._pop]

    def state_dict(self) -> dict[str, Any]:
        return {**self._header(), "next_key": self._next_key, "population": self._pop,
                "pending": [[k, v] for k, v in sorted(self._pending.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_header(state)
        self._next_key = int(state["next_key"])
        self._pop = [{"key": int(m["key"]), "x": [float(v) for v in m["x"]],
                      "f": None if m["f"] is None else [float(v) for v in m["f"]]} for m in state["population"]]
        self._pending = {int(k): {"x": [float(v) for v in p["x"]], "parents": [int(q) for q in p["parents"]],
                                  "generation": int(p["generation"])} for k, p in state["pending"]}
