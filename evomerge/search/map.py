"""MAP: amortized Pareto fronts from quadratic surrogates.

Li et al. 2024, "Low-compute Model Merging with Amortized Pareto Fronts via Quadratic Approximation".
For task-arithmetic coefficients the genes are the per-model coefficients; the genotype ``x`` in
``[0, 1]^T`` (T = ``dim``) decodes affinely into them, and a quadratic in ``c`` is a quadratic in ``x``,
so the surrogates are fitted directly over ``x``. Per objective i::

    m_i(x) = link( sum_k a_k x_k^2 + sum_{k<l} a_kl x_k x_l + sum_k b_k x_k + e )

with ``(T+1)(T+2)/2`` coefficients, fitted by least squares on ``link^-1(y)`` (``sigmoid``: the logit
of ``y`` clipped to ``[eps, 1-eps]``, for accuracies; ``softplus``: ``log(expm1(y))`` of ``y`` clipped to
``>= eps``, for losses; ``identity`` otherwise). A small ridge term (``ridge``, relative to the design
matrix's scale) keeps an under-determined fit (many failures) well posed.

**Kriging residual** (``residual: "gp"``, default): once the quadratic is overdetermined, a Gaussian
process (squared-exponential kernel with a nugget; length scale and nugget by maximum marginal
likelihood over a fixed grid) is fitted on its residuals in link space and added to it (universal
kriging with a quadratic trend). A quadratic misses narrow structure -- on the zoo v2 demo a ridge of
the cross objective -- that the residual picks up once a few points land near it; far from the data
the residual goes back to zero and the surrogate to the paper's quadratic. ``residual: null`` is the
paper's surrogate alone.

High ``dim``: the full quadratic has ``(T+1)(T+2)/2`` terms and the design needs twice that many real
evaluations (T = 12: 91 terms, 182 evaluations). ``variant="auto"`` (default) uses the full quadratic
up to ``max_full_dim`` (12) genes and the *diagonal* variant above (``sum_k a_k x_k^2 + sum_k b_k x_k +
e``, ``2T+1`` terms: no interactions); ``variant="full"`` or ``"diagonal"`` forces one.

Phases (one ``generation`` each, with a barrier: ``ask`` returns nothing while a phase's proposals are
outstanding, like CMA-ES; the driver keeps asking and gets the next phase once every result is back):

* generation 0, **design**: ``n_design`` points (default ``max(2 x terms, 10 x T)`` with the kriging
  residual and the full variant, else 2 x terms; with ``bayesian`` ``terms + 2``): the origin and the
  one-hot corners, isotropic points ``u * 1`` (u evenly spaced in (0, 1]) with Gaussian jitter
  (``jitter``), then a grid (T <= 2) or, for the rest, the most spread (maximin) of ``design_tries``
  Latin hypercubes;
* with ``bayesian: true``, generations 1..``bayesian_rounds``, **adaptive**: fit, compute each evaluated
  point's normalised surrogate error, bin the points by the angle of ``x`` (T = 2: ``n_bins`` equal
  angular sectors of the quadrant; T > 2: the nearest of ``n_bins`` reference directions -- the
  one-hots, the diagonal and seeded random directions of the positive orthant; at least T + 1 bins),
  score each bin
  ``mean error + 0.5 * spread`` (spread = std of the errors; an empty bin gets the highest score),
  sample bins by a softmax of ``score / max score / temperature`` and draw one new point per sample in
  its bin (a random direction inside the bin, a uniform radius);
* then **front** rounds: fit on every successful point so far, run NSGA-II (pymoo, in-process, seeded)
  on the surrogates -- each prediction moved ``optimism`` residual sds towards its better side (an upper
  confidence bound, so the search also looks where the residual is unsure) -- and hand out ``n_front``
  points of the predicted front for real evaluation: with ``acquisition: "hvi"`` (default, up to 4
  objectives) greedily by predicted hypervolume gain over the real front so far (a round extends the
  real front instead of re-evaluating parts of it already known), the rest spread; with ``"spread"``
  the extremes first, then farthest-point sampling in normalised objective space.
  ``front_rounds`` (None: unbounded) limits them; each later
  round refits on everything evaluated so far, including the previous fronts, so MAP keeps refining
  while the driver has budget. ``done()`` after the last front round or ``max_evals`` proposals.

State (plain data, exact resume): the proposals and the told values of every phase, each phase's
surrogate fit (coefficients, fit RMSE) and predicted values of its front points. Randomness is drawn
from generators seeded by ``(seed, generation)``, so there is no RNG state to carry beyond the
generation counter; NSGA-II runs against a saved and restored copy of the global RNGs (pymoo seeds
them). Results are kept in the user's units (the links apply to them).

The store and dashboard read ``surrogate_coefficients()`` (the latest fit) and ``fits`` in the state
(every round's fit and predicted front) to draw the predicted front against the real one.

**Nested MAP** (many models): :func:`nested_map_pairs` (see its docstring) merges groups pairwise with
2-D MAP and puts the chosen merge back into the pool.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from evomerge import front as frontlib
from evomerge.search.base import Algorithm, Proposal, SearchContext, normalize_directions, register
from evomerge.search.kriging import fit_residual, predict_residual, sq_dists
from evomerge.search.quadratic import (  # noqa: F401 - part of this module's API (tests, nested MAP)
    LINKS,
    features,
    fit_quadratic,
    link_apply,
    link_inverse,
    n_terms,
    predict_quadratic,
    spread_subset,
    term_names,
)


# --------------------------------------------------------------------------- the algorithm
@register
class MAP(Algorithm):
    name = "map"
    generational = True
    default_settings = {
        "links": None,  # per objective: "identity" (default), "sigmoid" (accuracies), "softplus" (losses)
        "variant": "auto",  # "auto" | "full" | "diagonal"
        "max_full_dim": 12,
        "n_design": None,  # None: max(2 x terms, 10 x dim) (diagonal variant: 2 x terms; bayesian: terms + 2)
        "jitter": 0.05,
        "design_tries": 32,  # Latin hypercubes drawn for the design's rest; the most spread one is kept
        "n_front": 16,
        "front_rounds": None,  # None: keep refining the front while asked
        "nsga_pop_size": 40,
        "nsga_generations": 60,
        "bayesian": False,
        "bayesian_rounds": 3,
        "bayesian_points": None,  # None: max(2, ceil(terms / 4)) per round
        "n_bins": 8,
        "temperature": 0.2,
        "eps": 1e-4,
        "ridge": 1e-10,
        "residual": "gp",  # "gp": a kriging residual on top of the quadratic once it is overdetermined; None
        "optimism": 1.0,  # front search on mean + optimism * residual sd (link space); 0: on the mean
        "acquisition": "hvi",  # "hvi": front points by predicted hypervolume gain; "spread": evenly spread
        "max_evals": None,
    }

    @classmethod
    def derive_settings(cls, settings: dict[str, Any], context: SearchContext) -> dict[str, Any]:
        out = dict(settings)
        if "links" not in out:
            # The surrogate needs a link per objective: values in [0, 1] get a sigmoid, others none.
            out["links"] = ["sigmoid" if b else "identity" for b in context.bounded]
        return out

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        links = s["links"]
        if links is None:
            self.links = ["identity"] * self.n_obj
        else:
            if isinstance(links, str):
                links = [links] * self.n_obj
            self.links = [str(v).lower() for v in links]
            if len(self.links) != self.n_obj or any(v not in LINKS for v in self.links):
                raise ValueError(f"map: links must be {self.n_obj} of {LINKS}, got {s['links']}")
        variant = str(s["variant"]).lower()
        if variant == "auto":
            variant = "full" if self.dim <= int(s["max_full_dim"]) else "diagonal"
        if variant not in ("full", "diagonal"):
            raise ValueError(f"map: variant must be 'auto', 'full' or 'diagonal', got {s['variant']!r}")
        self.variant = variant
        self.n_terms = n_terms(self.dim, variant)
        if int(s["n_front"]) < 1 or int(s["nsga_pop_size"]) < 4 or int(s["n_bins"]) < 1:
            raise ValueError("map: n_front >= 1, nsga_pop_size >= 4 and n_bins >= 1 are required")
        if s["n_design"] is not None:
            self.n_design = int(s["n_design"])
        else:
            self.n_design = self.n_terms + 2 if s["bayesian"] else 2 * self.n_terms
            if not s["bayesian"] and s["residual"] == "gp" and variant == "full":
                # The kriging residual learns what the quadratic misses only where the design looked:
                # at least the 10 x dim points of the usual rule for computer experiments (Loeppky et
                # al. 2009) -- more than 2 x terms up to dim 7 (dim 2: 20, not 12). The diagonal
                # variant (high dim) keeps 2 x terms, which budgets there are already stretched by.
                self.n_design = max(self.n_design, 10 * self.dim)
        if self.n_design < self.dim + 1:
            raise ValueError(f"map: n_design must be >= dim + 1 = {self.dim + 1}")
        bp = s["bayesian_points"]
        self.bayesian_points = max(2, math.ceil(self.n_terms / 4)) if bp is None else int(bp)
        self.bayesian_rounds = int(s["bayesian_rounds"]) if s["bayesian"] else 0
        self._directions_bins = self._bin_directions()
        self._reset()

    # ------------------------------------------------------------------ bookkeeping
    def _reset(self) -> None:
        self._next_key = 0
        self._generation = 0
        self._points: list[dict[str, Any]] = []  # told: {"key", "x", "values" (user units) or None}
        self._fits: list[dict[str, Any]] = []  # per fitted round
        self._cur: dict[str, Any] | None = None

    def _rng(self, tag: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % (2**63), self._generation, tag])

    def phase(self, generation: int | None = None) -> str:
        g = self._generation if generation is None else generation
        if g == 0:
            return "design"
        if g <= self.bayesian_rounds:
            return "adaptive"
        return "front"

    def _front_rounds_done(self) -> int:
        return max(0, self._generation - 1 - self.bayesian_rounds)

    def done(self) -> bool:
        if self._cur is not None:
            return False
        me = self.settings["max_evals"]
        if me is not None and self._next_key >= int(me):
            return True
        fr = self.settings["front_rounds"]
        return fr is not None and self._front_rounds_done() >= int(fr)

    # ------------------------------------------------------------------ phases
    def _design_points(self) -> np.ndarray:
        rng = self._rng(0)
        T, n = self.dim, self.n_design
        pts = [np.zeros(T)] + [np.eye(T)[k] for k in range(T)]
        n_iso = min(max(2, T + 1), max(0, n - len(pts)))
        for u in np.linspace(1.0, 0.0, n_iso, endpoint=False)[::-1]:
            pts.append(np.clip(u + self.settings["jitter"] * rng.standard_normal(T), 0.0, 1.0))
        rest = n - len(pts)
        if rest > 0:
            g = int(math.floor(rest ** (1.0 / T))) if T <= 2 else 0
            if g >= 3:
                axes = [np.linspace(0.0, 1.0, g + 2)[1:-1]] * T
                grid = np.array(np.meshgrid(*axes, indexing="ij")).reshape(T, -1).T
                pts.extend(grid)
                rest = n - len(pts)
            if rest > 0:  # Latin hypercube, the most spread of a few (maximin, with the points above)
                fixed = np.array(pts, dtype=float)
                best, best_d = None, -1.0
                for _ in range(int(self.settings["design_tries"])):
                    lhs = (rng.permuted(np.tile(np.arange(rest), (T, 1)), axis=1).T + rng.random((rest, T))) / rest
                    allp = np.vstack([fixed, lhs])
                    d = sq_dists(lhs, allp)
                    d[np.arange(rest), len(fixed) + np.arange(rest)] = np.inf
                    if float(d.min()) > best_d:
                        best, best_d = lhs, float(d.min())
                pts.extend(best)
        return np.array(pts[:n], dtype=float)

    def _bin_directions(self) -> np.ndarray:
        T, nb = self.dim, int(self.settings["n_bins"])
        if T == 1:
            return np.ones((1, 1))
        if T == 2:
            ang = (np.arange(nb) + 0.5) * (math.pi / 2) / nb
            return np.stack([np.cos(ang), np.sin(ang)], axis=1)
        dirs = [np.eye(T)[k] for k in range(T)] + [np.ones(T) / math.sqrt(T)]
        rng = np.random.default_rng([self.seed % (2**63), 7919])
        while len(dirs) < nb:
            v = np.abs(rng.standard_normal(T))
            dirs.append(v / np.linalg.norm(v))
        return np.array(dirs[: max(nb, T + 1)], dtype=float)  # at least the one-hots and the diagonal

    def bin_of(self, X: np.ndarray) -> np.ndarray:
        """Angular bin of each row of ``X`` (-1 for the origin, which has no angle)."""
        X = np.atleast_2d(np.asarray(X, dtype=float))
        norms = np.linalg.norm(X, axis=1)
        if self.dim == 2:
            ang = np.arctan2(X[:, 1], X[:, 0])
            nb = len(self._directions_bins)
            b = np.clip((ang / (math.pi / 2) * nb).astype(int), 0, nb - 1)
        else:
            b = np.argmax(X @ self._directions_bins.T, axis=1)
        return np.where(norms > 1e-12, b, -1)

    def _ok_data(self) -> tuple[np.ndarray, np.ndarray]:
        ok = [p for p in self._points if p["values"] is not None]
        X = np.array([p["x"] for p in ok], dtype=float).reshape(-1, self.dim)
        Y = np.array([p["values"] for p in ok], dtype=float).reshape(-1, self.n_obj)
        return X, Y

    def _fit(self, variant: str | None = None) -> dict[str, Any] | None:
        """A fit on every successful point; ``variant`` other than the study's (map_async's early
        diagonal fits) is recorded in the fit."""
        X, Y = self._ok_data()
        if len(X) < 2:
            return None
        s = self.settings
        v = variant or self.variant
        coefs, rmse, residuals = [], [], []
        kriging = s["residual"] == "gp" and len(X) > n_terms(self.dim, v)
        for i, link in enumerate(self.links):
            c = fit_quadratic(X, Y[:, i], v, link, float(s["eps"]), float(s["ridge"]))
            if kriging:
                t = link_inverse(Y[:, i], link, float(s["eps"]))
                res = fit_residual(X, t - features(X, v) @ c)
                residuals.append(res)
                z = features(X, v) @ c + (0.0 if res is None else predict_residual(res, X, X)[0])
                pred = link_apply(z, link)
            else:
                pred = predict_quadratic(c, X, v, link)
            coefs.append([float(v) for v in c])
            rmse.append(float(np.sqrt(np.mean((pred - Y[:, i]) ** 2))))
        fit = {"generation": self._generation, "phase": self.phase(), "n_points": int(len(X)),
               "coefficients": coefs, "rmse": rmse}
        if kriging:
            fit["residuals"] = residuals
            fit["x"] = [[float(t) for t in row] for row in X]
        if v != self.variant:
            fit["variant"] = v
        return fit

    def predict(self, X: Any, fit: dict[str, Any] | None = None) -> np.ndarray:
        """Surrogate predictions (user units), shape ``(n, n_obj)``, from the latest (or the given) fit."""
        fit = fit if fit is not None else (self._fits[-1] if self._fits else None)
        if fit is None:
            raise RuntimeError("map: no surrogate has been fitted yet")
        return self._predict(X, fit, 0.0)

    def _predict(self, X: Any, fit: dict[str, Any], optimism: float) -> np.ndarray:
        """Predictions in user units; ``optimism`` > 0 moves each one ``optimism`` residual-GP sds (link
        space) towards the objective's better side (an upper confidence bound: where the surrogate
        knows little, the front search may look)."""
        X = np.atleast_2d(np.asarray(X, dtype=float))
        v = fit.get("variant", self.variant)
        residuals = fit.get("residuals") or [None] * self.n_obj
        out = []
        for i, (c, link) in enumerate(zip(fit["coefficients"], self.links, strict=True)):
            z = features(X, v) @ np.asarray(c, dtype=float)
            res = residuals[i]
            if res is not None:
                mean, sd = predict_residual(res, np.asarray(fit["x"], dtype=float), X, with_sd=optimism > 0)
                z = z + mean
                if sd is not None:
                    z = z - self._signs[i] * optimism * sd
            out.append(link_apply(z, link))
        return np.stack(out, axis=1)

    def bin_scores(self, fit: dict[str, Any]) -> np.ndarray:
        """Per-bin score ``mean error + 0.5 * spread`` of the normalised surrogate errors."""
        X, Y = self._ok_data()
        nb = len(self._directions_bins)
        if len(X) == 0:
            return np.ones(nb)
        scale = np.std(Y, axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        err = np.mean(np.abs(self.predict(X, fit) - Y) / scale, axis=1)
        bins = self.bin_of(X)
        scores = np.full(nb, np.nan)
        for b in range(nb):
            e = err[bins == b]
            if len(e):
                scores[b] = float(np.mean(e) + 0.5 * np.std(e))
        top = np.nanmax(scores) if np.any(np.isfinite(scores)) else 1.0
        return np.where(np.isfinite(scores), scores, top if top > 0 else 1.0)

    def _sample_in_bin(self, b: int, rng: np.random.Generator) -> np.ndarray:
        T = self.dim
        if T == 1:
            d = np.ones(1)
        elif T == 2:
            nb = len(self._directions_bins)
            a = (b + rng.random()) * (math.pi / 2) / nb
            d = np.array([math.cos(a), math.sin(a)])
        else:
            d = self._directions_bins[b]
            for _ in range(200):
                v = np.abs(rng.standard_normal(T))
                if self.bin_of(v)[0] == b:
                    d = v
                    break
        d = d / np.max(d)  # the box's boundary in that direction
        return np.clip(d * rng.uniform(0.05, 1.0), 0.0, 1.0)

    def _adaptive_points(self, fit: dict[str, Any] | None) -> tuple[np.ndarray, dict[str, Any]]:
        rng = self._rng(1)
        nb = len(self._directions_bins)
        scores = np.ones(nb) if fit is None else self.bin_scores(fit)
        z = scores / max(float(np.max(scores)), 1e-12) / float(self.settings["temperature"])
        p = np.exp(z - np.max(z))
        p /= p.sum()
        chosen = rng.choice(nb, size=self.bayesian_points, p=p)
        X = np.array([self._sample_in_bin(int(b), rng) for b in chosen])
        info = {"bin_scores": [float(v) for v in scores], "bin_probs": [float(v) for v in p],
                "chosen_bins": [int(b) for b in chosen]}
        return X, info

    def _run_nsga(self, fit: dict[str, Any], salt: int = 0, optimism: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Approximate front of the surrogates: (X, predictions in user units); ``salt`` > 0 gives
        another seed for the same round (map_async, when a round's front is all handed out)."""
        # pymoo only for map studies (the surrogate front): the algorithm registry stays light
        from pymoo.algorithms.moo.nsga2 import NSGA2 as _NSGA2
        from pymoo.core.problem import Problem
        from pymoo.optimize import minimize

        signs = self._signs
        algo_self = self

        class _Surrogate(Problem):
            def _evaluate(self, X, out, *args, **kwargs):  # noqa: N803
                out["F"] = algo_self._predict(X, fit, optimism) * signs

        words = [self.seed % (2**63), self._generation, 2] + ([int(salt)] if salt else [])
        seed = int(np.random.SeedSequence(words).generate_state(1)[0])
        outer_np, outer_py = np.random.get_state(), random.getstate()
        try:
            res = minimize(_Surrogate(n_var=self.dim, n_obj=self.n_obj, xl=0.0, xu=1.0),
                           _NSGA2(pop_size=int(self.settings["nsga_pop_size"])),
                           ("n_gen", int(self.settings["nsga_generations"])), seed=seed, verbose=False)
        finally:
            np.random.set_state(outer_np)
            random.setstate(outer_py)
        if self.n_obj == 1:
            X = np.asarray(res.pop.get("X"), dtype=float)
        else:
            X = np.atleast_2d(np.asarray(res.opt.get("X"), dtype=float))
        X = np.clip(X, 0.0, 1.0)
        F = self._predict(X, fit, optimism)
        return X, F

    def _front_points(self, fit: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray | None]:
        rng = self._rng(3)
        n = int(self.settings["n_front"])
        if fit is None:  # nothing succeeded yet: another random batch
            return rng.random((n, self.dim)), None
        X, F = self._run_nsga(fit, optimism=float(self.settings["optimism"]))
        order = np.argsort((F * self._signs)[:, 0], kind="stable")
        X, F = X[order], F[order]
        # drop near-duplicates, then spread the chosen points over the front
        keep: list[int] = []
        for i in range(len(X)):
            if all(np.max(np.abs(X[i] - X[j])) > 1e-6 for j in keep):
                keep.append(i)
        X, F = X[keep], F[keep]
        if self.n_obj == 1:
            idx = np.arange(min(n, len(X)))
        elif self.settings["acquisition"] == "hvi" and self.n_obj <= 4:
            idx = self._hvi_subset(F * self._signs, n)
        else:
            idx = spread_subset(F * self._signs, n)
        X, F = X[idx], F[idx]
        # a point evaluated before gets a small jitter instead of a wasted repeat
        seen = np.array([p["x"] for p in self._points], dtype=float).reshape(-1, self.dim)
        for i in range(len(X)):
            if len(seen) and np.min(np.max(np.abs(seen - X[i]), axis=1)) < 1e-9:
                X[i] = np.clip(X[i] + 0.01 * rng.standard_normal(self.dim), 0.0, 1.0)
        return X, (self.predict(X, fit) if len(X) else F)

    def _hvi_subset(self, F: np.ndarray, n: int) -> np.ndarray:
        """Indices of ``n`` rows of ``F`` (predicted, minimisation form) chosen greedily by hypervolume
        gain over the front of every real result so far and the rows already chosen (whose predictions
        are believed): a round adds the predicted points that extend the real front most, not those
        that repeat a part of it already evaluated. The reference point is the worst of the real and
        predicted values plus a tenth of their range. Once no row gains, the rest are spread
        (``spread_subset``) over the rows left."""
        if len(F) <= n:
            return np.arange(len(F))
        _, Y = self._ok_data()
        R = Y * self._signs if len(Y) else np.empty((0, self.n_obj))
        both = np.vstack([R, F])
        lo, hi = both.min(axis=0), both.max(axis=0)
        span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
        G, Rn = (F - lo) / span, (R - lo) / span
        ref = np.full(self.n_obj, 1.1)
        base = Rn[frontlib.non_dominated(Rn)] if len(Rn) else Rn
        chosen: list[int] = []
        hv0 = frontlib.hypervolume(base, ref) if len(base) else 0.0
        while len(chosen) < n:
            gains = np.full(len(G), -1.0)
            for i in range(len(G)):
                if i not in chosen:
                    gains[i] = frontlib.hypervolume(np.vstack([base, G[i:i + 1]]), ref) - hv0
            i = int(np.argmax(gains))
            if gains[i] <= 1e-12:
                break
            chosen.append(i)
            base = np.vstack([base, G[i:i + 1]])
            base = base[frontlib.non_dominated(base)]
            hv0 += float(gains[i])
        if len(chosen) < n:
            rest = np.array([i for i in range(len(G)) if i not in chosen])
            chosen += [int(rest[j]) for j in spread_subset(G[rest], n - len(chosen))]
        return np.array(sorted(chosen))

    def _start_generation(self) -> None:
        phase = self.phase()
        info: dict[str, Any] = {}
        predicted = None
        fit = None
        if phase == "design":
            X = self._design_points()
        else:
            fit = self._fit()
            if fit is not None:
                self._fits.append(fit)
            if phase == "adaptive":
                X, info = self._adaptive_points(fit)
            else:
                X, pred = self._front_points(fit)
                predicted = None if pred is None else [[float(v) for v in row] for row in pred]
        me = self.settings["max_evals"]
        if me is not None:
            X = X[: max(0, int(me) - self._next_key)]
            if predicted is not None:
                predicted = predicted[: len(X)]
        props = [Proposal(key=self._next_key + i, x=[float(v) for v in x], parents=[],
                          generation=self._generation) for i, x in enumerate(X)]
        self._next_key += len(props)
        self._cur = {"phase": phase, "proposals": props, "handed": 0, "results": {},
                     "predicted": predicted, "info": info}
        if fit is not None:
            fit.update({"predicted_front": predicted, **info,
                                   "keys": [p.key for p in props]})

    def _complete_generation(self) -> None:
        cur = self._cur
        assert cur is not None
        for p in cur["proposals"]:
            self._points.append({"key": p.key, "x": list(p.x), "values": cur["results"][p.key]})
        self._cur = None
        self._generation += 1

    # ------------------------------------------------------------------ interface
    def ask(self, n: int) -> list[Proposal]:
        out: list[Proposal] = []
        while len(out) < int(n):
            if self._cur is None:
                if self.done():
                    break
                self._start_generation()
            cur = self._cur
            assert cur is not None
            props = cur["proposals"]
            if not props:
                self._complete_generation()
                if self.done():
                    break
                continue
            if cur["handed"] >= len(props):
                break
            take = props[cur["handed"]: cur["handed"] + (int(n) - len(out))]
            cur["handed"] += len(take)
            out.extend(Proposal(p.key, list(p.x), [], p.generation) for p in take)
        return out

    def tell(self, results: list[tuple[int, list[float] | None]]) -> None:
        for key, values in results:
            cur = self._cur
            if cur is None:
                continue
            props = cur["proposals"]
            key = int(key)
            idx = key - (props[0].key if props else 0)
            if not (0 <= idx < cur["handed"]) or key in cur["results"]:
                continue
            fmin = self.to_min(values)
            cur["results"][key] = None if fmin is None else [float(v) for v in values]  # type: ignore[union-attr]
            if len(cur["results"]) == len(props):
                self._complete_generation()

    @property
    def outstanding(self) -> list[int]:
        if self._cur is None:
            return []
        return [p.key for p in self._cur["proposals"][: self._cur["handed"]] if p.key not in self._cur["results"]]

    @property
    def generation(self) -> int:
        return self._generation

    def surrogate_coefficients(self, refit: bool = False) -> dict[str, Any] | None:
        """The latest surrogate (or a fit on everything told so far with ``refit``), as plain data:
        ``{"variant", "terms", "links", "directions", "coefficients" (one list per objective, in
        ``terms`` order), "rmse", "n_points", "generation", "phase"}``; None before the first fit."""
        fit = self._fit() if refit else (self._fits[-1] if self._fits else None)
        if fit is None:
            return None
        v = fit.get("variant", self.variant)
        return {"variant": v, "terms": term_names(self.dim, v),
                "links": list(self.links), "directions": list(self.directions),
                **{k: fit[k] for k in ("coefficients", "rmse", "n_points", "generation", "phase")}}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        cur = None
        if self._cur is not None:
            c = self._cur
            cur = {"phase": c["phase"], "proposals": [p.to_dict() for p in c["proposals"]],
                   "handed": c["handed"], "results": [[k, v] for k, v in sorted(c["results"].items())],
                   "predicted": c["predicted"], "info": c["info"]}
        return {**self._header(), "variant": self.variant, "next_key": self._next_key,
                "generation": self._generation, "phase": self.phase(), "points": self._points,
                "fits": self._fits, "current": cur}

    def _load_points(self, state: dict[str, Any]) -> None:
        """What every MAP variant's state holds: the header, the variant, the counters and the points."""
        self._check_header(state)
        if state.get("variant") != self.variant:
            raise ValueError(f"{self.name}: state has variant {state.get('variant')!r}, this one {self.variant!r}")
        self._reset()
        self._next_key = int(state["next_key"])
        self._generation = int(state["generation"])
        self._points = [{"key": int(p["key"]), "x": [float(v) for v in p["x"]],
                         "values": None if p["values"] is None else [float(v) for v in p["values"]]}
                        for p in state["points"]]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_points(state)
        self._fits = [dict(f) for f in state["fits"]]
        c = state.get("current")
        if c is not None:
            self._cur = {"phase": c["phase"], "proposals": [Proposal.from_dict(p) for p in c["proposals"]],
                         "handed": int(c["handed"]),
                         "results": {int(k): (None if v is None else [float(x) for x in v])
                                     for k, v in c["results"]},
                         "predicted": c["predicted"], "info": dict(c["info"])}


# --------------------------------------------------------------------------- nested MAP
def nested_map_pairs(
    n_models: int,
    evaluate: Callable[[list[float], list[list[int]]], list[float] | None],
    *,
    direction: str = "maximize",
    link: str = "identity",
    coef_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    weights: Sequence[float] | None = None,
    map_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plan a many-model task-arithmetic merge with pairwise 2-D MAP (the paper's *nested MAP*).

    The pool starts with one group per model (``[0], [1], ...``), each with a coefficient vector over
    the ``n_models`` task vectors (one-hot). While more than one group is left, the two smallest groups
    (ties: lowest index; a balanced, Huffman-like tree) are merged: a 2-D MAP study over
    ``(c_left, c_right)`` (genes in [0, 1] decoded linearly into ``coef_range``) runs to completion
    with ``front_rounds=1`` -- design, fit, NSGA on the surrogates, real evaluation of the predicted
    front -- where the merged model's coefficients are ``c_left * coefs[left] + c_right * coefs[right]``
    and its two objectives are the metric averaged over each side's tasks. Among the *really evaluated*
    points, the one with the best task-count-weighted mean metric (times ``weights`` per model when
    given) is chosen, and the merged group goes back into the pool. After ``n_models - 1`` merges
    the last group's coefficients are a plain task-arithmetic recipe over the original models.

    ``evaluate(coefficients, groups)`` gets a coefficient per original model and a list of task groups
    and returns one value per group (the metric averaged over that group's tasks), or None on failure.

    How the driver runs it: each pairwise step is an ordinary MAP study of ``dim=2`` whose genome
    decodes ``x`` into the per-model coefficients ``c_left * coefs[left] + c_right * coefs[right]``
    (layer_groups 1, task arithmetic over the original models); the driver evaluates its candidates on
    its workers like any study and, when the step's study is ``done()``, calls the same choice rule and
    starts the next pair. ``evaluate`` here is that round trip made synchronous (a function that
    submits the recipes and waits), which is how tests and benchmarks use it.

    Returns ``{"coefficients": [...], "steps": [{"left", "right", "members", "chosen_c",
    "chosen_values", "coefficients", "evaluations", "surrogate"}, ...], "evaluations": total}``.
    """
    if n_models < 2:
        raise ValueError("nested_map_pairs needs at least 2 models")
    direction = normalize_directions([direction])[0]
    lo, hi = float(coef_range[0]), float(coef_range[1])
    w = np.ones(n_models) if weights is None else np.asarray(weights, dtype=float)
    pool: list[dict[str, Any]] = [{"members": [i], "coefficients": list(np.eye(n_models)[i])}
                                  for i in range(n_models)]
    steps = []
    total = 0
    settings = {"front_rounds": 1, "n_front": 8, "n_design": 12, "links": [link, link], **(map_settings or {})}
    step_no = 0
    while len(pool) > 1:
        order = sorted(range(len(pool)), key=lambda i: (len(pool[i]["members"]), i))
        i, j = sorted(order[:2])
        left, right = pool[i], pool[j]
        groups = [left["members"], right["members"]]
        algo = MAP(dim=2, directions=[direction, direction], seed=seed * 1000 + step_no, **settings)
        evaluated: list[tuple[np.ndarray, list[float]]] = []

        def coefs_for(x: Sequence[float], left=left, right=right) -> np.ndarray:
            c = lo + (hi - lo) * np.asarray(x, dtype=float)
            return c[0] * np.asarray(left["coefficients"]) + c[1] * np.asarray(right["coefficients"])

        while not algo.done():
            props = algo.ask(10_000)
            if not props:
                break
            res = []
            for p in props:
                v = evaluate([float(t) for t in coefs_for(p.x)], [list(g) for g in groups])
                res.append((p.key, v))
                if v is not None and all(math.isfinite(float(t)) for t in v):
                    evaluated.append((np.asarray(p.x), [float(t) for t in v]))
            total += len(props)
            algo.tell(res)
        if not evaluated:
            raise RuntimeError(f"nested MAP: every evaluation failed when merging {groups}")
        sign = 1.0 if direction == "maximize" else -1.0
        gw = np.array([w[left["members"]].sum(), w[right["members"]].sum()])

        def utility(v: list[float], gw=gw, sign=sign) -> float:
            return sign * float(np.dot(gw, v) / gw.sum())

        best_x, best_v = max(evaluated, key=lambda e: utility(e[1]))
        merged = {"members": sorted(left["members"] + right["members"]),
                  "coefficients": [float(t) for t in coefs_for(best_x)]}
        steps.append({"left": left["members"], "right": right["members"], "members": merged["members"],
                      "chosen_c": [float(lo + (hi - lo) * t) for t in best_x], "chosen_values": best_v,
                      "coefficients": merged["coefficients"], "evaluations": algo._next_key,
                      "surrogate": algo.surrogate_coefficients()})
        pool = [g for k, g in enumerate(pool) if k not in (i, j)]
        pool.insert(i, merged)
        step_no += 1
    return {"coefficients": pool[0]["coefficients"], "steps": steps, "evaluations": total}
