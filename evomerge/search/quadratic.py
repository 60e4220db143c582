"""MAP's surrogate: a quadratic in the merge coefficients per objective, fitted by least squares through a
link (identity, sigmoid for accuracies, softplus for positive scores), and the spread subset of a
predicted front. Pure functions on arrays."""

from __future__ import annotations

import numpy as np

LINKS = ("identity", "sigmoid", "softplus")


# --------------------------------------------------------------------------- quadratic features
def n_terms(dim: int, variant: str) -> int:
    return (dim + 1) * (dim + 2) // 2 if variant == "full" else 2 * dim + 1


def term_names(dim: int, variant: str) -> list[str]:
    """Names of the surrogate's terms in coefficient order: ``1, x_k, x_k^2, x_k*x_l (k<l)``."""
    names = ["1"] + [f"x{k}" for k in range(dim)] + [f"x{k}^2" for k in range(dim)]
    if variant == "full":
        names += [f"x{k}*x{m}" for k in range(dim) for m in range(k + 1, dim)]
    return names


def features(X: np.ndarray, variant: str) -> np.ndarray:
    X = np.atleast_2d(np.asarray(X, dtype=float))
    n, d = X.shape
    cols = [np.ones((n, 1)), X, X**2]
    if variant == "full" and d > 1:
        iu = np.triu_indices(d, k=1)
        cols.append(X[:, iu[0]] * X[:, iu[1]])
    return np.hstack(cols)


def link_inverse(y: np.ndarray, link: str, eps: float) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if link == "sigmoid":
        p = np.clip(y, eps, 1.0 - eps)
        return np.log(p) - np.log1p(-p)
    if link == "softplus":
        v = np.maximum(y, eps)
        return np.where(v > 30.0, v, np.log(np.expm1(np.minimum(v, 30.0))))
    return y


def link_apply(z: np.ndarray, link: str) -> np.ndarray:
    z = np.asarray(z, dtype=float)
    if link == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    if link == "softplus":
        return np.logaddexp(0.0, z)
    return z


def fit_quadratic(X: np.ndarray, y: np.ndarray, variant: str = "full", link: str = "identity",
                  eps: float = 1e-4, ridge: float = 1e-10) -> np.ndarray:
    """Least-squares coefficients (``term_names`` order) of ``link^-1(y) ~ quadratic(X)``."""
    A = features(X, variant)
    t = link_inverse(y, link, eps)
    lam = ridge * max(1.0, float(np.mean(A * A)) * A.shape[0])
    AtA = A.T @ A + lam * np.eye(A.shape[1])
    coef = np.linalg.lstsq(AtA, A.T @ t, rcond=None)[0]
    return coef


def predict_quadratic(coef: np.ndarray, X: np.ndarray, variant: str, link: str) -> np.ndarray:
    return link_apply(features(X, variant) @ np.asarray(coef, dtype=float), link)


def spread_subset(F: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` rows of ``F`` spread over the front: the extremes of each objective first, then
    greedy farthest-point sampling in objective space normalised to [0, 1] per objective."""
    F = np.asarray(F, dtype=float)
    if len(F) <= n:
        return np.arange(len(F))
    lo, hi = F.min(axis=0), F.max(axis=0)
    G = (F - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
    chosen: list[int] = []
    for j in range(F.shape[1]):
        i = int(np.argmin(G[:, j]))
        if i not in chosen and len(chosen) < n:
            chosen.append(i)
    dist = np.min(np.linalg.norm(G[:, None, :] - G[chosen][None, :, :], axis=2), axis=1)
    while len(chosen) < n:
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(G - G[i], axis=1))
    return np.array(sorted(chosen))
