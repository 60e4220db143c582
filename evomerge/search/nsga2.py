"""NSGA-II (pymoo) through its ask/tell interface, multi-objective.

pymoo's ``NSGA2`` with its defaults (SBX crossover, polynomial mutation, binary tournament on rank and
crowding, duplicate elimination) on the unit cube. The first generation is ``pop_size`` uniform
samples; each later one is ``n_offsprings`` (default ``pop_size``) children of the surviving
population, and survival is (mu + lambda) over parents and children.

Failures: a failed candidate (None, NaN or inf) is told as *infeasible* (one inequality constraint,
violated by 1) with objective values set to the worst seen so far in each objective plus a margin;
pymoo ranks every infeasible individual behind every feasible one and tournament selection prefers
feasible parents, so a failure is dominated by everything.

Lineage: each child's ``parents`` are the keys of the two individuals its crossover used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.search.base import register
from evomerge.search.generational import GenerationalAlgorithm


class _TrackParents:
    """Wraps the crossover operator so that every child remembers its parents' keys."""

    def __init__(self, crossover: Any) -> None:
        self._inner = crossover

    def __getattr__(self, item: str) -> Any:
        if item == "_inner":  # during copy/unpickling, before __init__
            raise AttributeError(item)
        return getattr(self._inner, item)

    def __call__(self, problem: Any, elem: Any, *args: Any, **kwargs: Any) -> Any:
        off = self._inner(problem, elem, *args, **kwargs)
        n_matings = len(elem)
        for r, ind in enumerate(off):
            mating = elem[r % n_matings]
            ind.set("evomerge_parents", [int(p.get("evomerge_key")) for p in mating])
        return off


@register
class NSGA2(GenerationalAlgorithm):
    name = "nsga2"
    generational = True
    default_settings = {
        "pop_size": 16,
        "n_offsprings": None,  # None: pop_size
        "max_generations": None,
    }

    def _pymoo_algorithm(self) -> Any:
        """The pymoo algorithm this class steps through ask/tell (NSGA-III gives its own)."""
        from pymoo.algorithms.moo.nsga2 import NSGA2 as _NSGA2  # pymoo only for these studies

        pop_size = int(self.settings["pop_size"])
        if pop_size < 2:
            raise ValueError("nsga2: pop_size must be >= 2")
        n_off = self.settings["n_offsprings"]
        return _NSGA2(pop_size=pop_size, n_offsprings=None if n_off is None else int(n_off))

    def _lib_new(self) -> None:
        # pymoo only for nsga2 studies: the algorithm registry stays light
        from pymoo.core.problem import Problem
        from pymoo.core.termination import NoTermination

        self._problem = Problem(n_var=self.dim, n_obj=self.n_obj, n_ieq_constr=1, xl=0.0, xu=1.0)
        algo = self._pymoo_algorithm()
        algo.mating.crossover = _TrackParents(algo.mating.crossover)
        algo.setup(self._problem, seed=self.seed % (2**32), termination=NoTermination(), verbose=False)
        self._algo = algo
        self._pending = None
        self._key_base = 0
        self._worst: np.ndarray | None = None

    def _lib_ask(self) -> tuple[list[list[float]], list[list[int]]]:
        pop = self._algo.ask()
        # keys are assigned in sampling order by the caller: next_key is known to the base class
        base = self._key_base  # the n-th sample of the study gets key n (live and in replay)
        parents = []
        for i, ind in enumerate(pop):
            ind.set("evomerge_key", base + i)
            p = ind.get("evomerge_parents")
            parents.append([] if p is None else [int(k) for k in p])
        self._pending = pop
        self._key_base = base + len(pop)
        X = pop.get("X")
        return [list(map(float, x)) for x in X], parents


    def _lib_tell(self, results: list[list[float] | None]) -> None:
        from pymoo.core.evaluator import Evaluator  # pymoo only for nsga2 studies
        from pymoo.problems.static import StaticProblem

        ok = [np.asarray(r, dtype=float) for r in results if r is not None]
        if ok:
            w = np.max(np.vstack(ok), axis=0)
            self._worst = w if self._worst is None else np.maximum(self._worst, w)
        if self._worst is None:
            penalty = np.full(self.n_obj, 1e6)
        else:
            penalty = self._worst + np.maximum(1.0, np.abs(self._worst))
        F = np.array([penalty if r is None else np.asarray(r, dtype=float) for r in results], dtype=float)
        G = np.array([[1.0 if r is None else -1.0] for r in results], dtype=float)
        F = F.reshape(len(results), self.n_obj)
        pop = self._pending
        Evaluator().eval(StaticProblem(self._problem, F=F, G=G), pop)
        self._algo.tell(infills=pop)
        self._pending = None

    @staticmethod
    def _lib_versions() -> dict[str, str]:
        import pymoo  # pymoo only for nsga2 studies

        return {"pymoo": str(pymoo.__version__), "numpy": np.__version__}

    def done(self) -> bool:
        mg = self.settings["max_generations"]
        return mg is not None and self._generation >= int(mg)
