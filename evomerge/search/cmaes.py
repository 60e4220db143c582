"""CMA-ES (library ``cma``) on a weighted sum of the objectives.

Follows the evolutionary model-merge paper (Akiba et al. 2024): every gene starts at ``x0 = 0.5``,
``sigma0 = 1/6``, population ``4 + floor(3 ln dim)`` (cma's default) unless ``popsize`` is given.
Bounds are handled by decoding, not rejection: cma is told the unclipped sample, the proposal carries
the sample clipped into [0, 1].

Scalarisation: ``f = sum_i w_i * f_i`` over the objectives in minimisation form (maximised objectives
negated), ``w`` = the constructor's ``weights`` (default all 1). A failed candidate gets a penalty
above the worst scalar fitness seen so far in the study: ``worst + max(1, |worst|)`` (``1e6`` when
nothing has succeeded yet), so cma moves away from it without the penalty swamping its ranking.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evomerge.search.base import register
from evomerge.search.generational import GenerationalAlgorithm

NO_SUCCESS_PENALTY = 1e6


@register
class CMAES(GenerationalAlgorithm):
    name = "cmaes"
    multi_objective = False
    generational = True
    default_settings = {
        "popsize": None,  # None: 4 + floor(3 ln dim)
        "sigma0": 1.0 / 6.0,
        "x0": 0.5,  # a float (every gene) or a list of dim floats
        "max_generations": None,  # done() after this many told generations
        "cma_options": None,  # extra cma options (plain data), e.g. {"CMA_diagonal": True}
    }

    def _lib_new(self) -> None:
        import cma  # cma only for cmaes studies: the algorithm registry stays light

        x0 = self.settings["x0"]
        x0 = [float(x0)] * self.dim if np.isscalar(x0) else [float(v) for v in x0]
        if len(x0) != self.dim:
            raise ValueError(f"cmaes: x0 has {len(x0)} values for dim {self.dim}")
        opts: dict[str, Any] = {
            "seed": float("nan"),  # no reseeding: sampling runs under the algorithm's private RNG
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "verb_filenameprefix": "",
            "maxiter": math.inf,
            "maxfevals": math.inf,
        }
        if self.settings["popsize"] is not None:
            opts["popsize"] = int(self.settings["popsize"])
        opts.update(self.settings["cma_options"] or {})
        self._es = cma.CMAEvolutionStrategy(x0, float(self.settings["sigma0"]), opts)
        self._worst: float | None = None

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    def _lib_ask(self) -> tuple[list[list[float]], list[list[int]]]:
        X = self._es.ask()
        self._last_X = X
        return [list(map(float, x)) for x in X], [[] for _ in X]

    def _decode(self, raw: list[float]) -> list[float]:
        return [min(1.0, max(0.0, float(v))) for v in raw]

    def scalarize(self, fmin: list[float] | None) -> float | None:
        if fmin is None:
            return None
        return float(sum(w * v for w, v in zip(self.weights, fmin, strict=True)))

    def _lib_tell(self, results: list[list[float] | None]) -> None:
        scal = [self.scalarize(r) for r in results]
        ok = [s for s in scal if s is not None and math.isfinite(s)]
        if ok:
            w = max(ok)
            self._worst = w if self._worst is None else max(self._worst, w)
        if self._worst is None:
            penalty = NO_SUCCESS_PENALTY
        else:
            penalty = self._worst + max(1.0, abs(self._worst))
        fit = [s if s is not None and math.isfinite(s) else penalty for s in scal]
        self._es.tell(self._last_X, fit)

    @staticmethod
    def _lib_versions() -> dict[str, str]:
        import cma  # cma only for cmaes studies: the algorithm registry stays light

        return {"cma": str(cma.__version__), "numpy": np.__version__}

    def done(self) -> bool:
        mg = self.settings["max_generations"]
        return mg is not None and self._generation >= int(mg)


@register
class AsyncCMAES(CMAES):
    """Asynchronous CMA-ES: every ask is a sample of the current distribution (mean + sigma * chol(C) z,
    z from a generator seeded by the proposal's key), and the first ``popsize`` results back, whichever
    samples they are, form the next generation (injected into cma unrepaired, then told), so no worker
    waits for a generation's slowest member; a straggler joins a later generation. With many more workers
    than ``popsize`` most members come from a distribution some generations old: give such a cluster a
    ``popsize`` near its number of workers."""

    name = "cmaes_async"
    generational = False
    asks_ahead = True

    def _lib_popsize(self) -> int:
        return self.popsize

    def _lib_ahead(self, keys: list[int]) -> list[list[float]]:
        mean = np.asarray(self._es.mean, dtype=float)
        chol = np.linalg.cholesky(np.asarray(self._es.C, dtype=float))
        sigma = float(self._es.sigma)
        out = []
        for key in keys:
            z = np.random.default_rng([self.seed % (2**63), key]).standard_normal(self.dim)
            out.append([float(v) for v in mean + sigma * chol @ z])
        return out

    def _lib_inject(self, raw: list[list[float]]) -> None:
        self._es.inject([np.asarray(r, dtype=float) for r in raw], force=False)
