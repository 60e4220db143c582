"""The kriging residual of MAP's surrogate: a Gaussian process on what the quadratic leaves unexplained.

Kept apart from :mod:`evomerge.search.map` (plain numpy, no state): fitted per objective and round, its
result is plain data (length scale, nugget, variance, weights) stored in MAP's fits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Length scales (times sqrt(dim), the box's diagonal scale) and nuggets (shares of the residual's
# variance) tried by maximum marginal likelihood: a small grid is enough for a one-length-scale kernel
# and keeps the fit deterministic and cheap (n is tens to a few hundred points).
GP_LENGTH_SCALES = (0.05, 0.08, 0.12, 0.18, 0.27, 0.4, 0.6)
GP_NUGGETS = (1e-3, 1e-2, 0.05, 0.2)


def sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return np.maximum(np.sum(A * A, 1)[:, None] + np.sum(B * B, 1)[None, :] - 2.0 * A @ B.T, 0.0)


def fit_residual(X: np.ndarray, r: np.ndarray) -> dict[str, Any] | None:
    """A zero-mean Gaussian process (squared-exponential kernel, nugget) on the quadratic's residuals
    ``r`` (link space): length scale and nugget by maximum marginal likelihood over a fixed grid, the
    signal variance profiled out. None when there is nothing to fit (fewer than 3 points, or residuals
    that are all zero)."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    r = np.asarray(r, dtype=float)
    n, d = X.shape
    if n < 3 or float(np.max(np.abs(r))) < 1e-12:
        return None
    D = sq_dists(X, X)
    best: tuple[float, float, float] | None = None
    for ls in GP_LENGTH_SCALES:
        ell = ls * math.sqrt(d)
        K0 = np.exp(-0.5 * D / ell**2)
        for nug in GP_NUGGETS:
            try:
                L = np.linalg.cholesky(K0 + nug * np.eye(n))
            except np.linalg.LinAlgError:
                continue
            a = np.linalg.solve(L, r)
            s2 = float(a @ a) / n
            if s2 <= 0:
                continue
            nll = 0.5 * n * math.log(s2) + float(np.sum(np.log(np.diag(L))))
            if best is None or nll < best[0]:
                best = (nll, ell, nug)
    if best is None:
        return None
    _, ell, nug = best
    K = np.exp(-0.5 * D / ell**2) + nug * np.eye(n)
    alpha = np.linalg.solve(K, r)
    s2 = float(r @ alpha) / n
    return {"length_scale": float(ell), "nugget": float(nug), "variance": s2,
            "alpha": [float(v) for v in alpha]}


def predict_residual(res: dict[str, Any], X_train: np.ndarray, X: np.ndarray,
                     with_sd: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The residual GP's mean at ``X`` (link space) and, with ``with_sd``, its predictive sd (the
    signal's, without the nugget: the uncertainty of the function, not of one evaluation)."""
    ell = float(res["length_scale"])
    Ks = np.exp(-0.5 * sq_dists(np.atleast_2d(X), np.atleast_2d(X_train)) / ell**2)
    mean = Ks @ np.asarray(res["alpha"], dtype=float)
    if not with_sd:
        return mean, None
    Xt = np.atleast_2d(X_train)
    K = np.exp(-0.5 * sq_dists(Xt, Xt) / ell**2) + float(res["nugget"]) * np.eye(len(Xt))
    v = np.linalg.solve(K, Ks.T)
    var = float(res["variance"]) * np.maximum(1.0 - np.sum(Ks.T * v, axis=0), 0.0)
    return mean, np.sqrt(var)
