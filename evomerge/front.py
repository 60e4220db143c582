"""Multi-objective utilities: minimisation form, non-dominated filter, reference point, hypervolume.

Everything here works on matrices ``F`` of shape ``(n, m)`` in *minimisation* form (maximised
objectives negated, see :func:`to_minimization`). Rows with NaN or inf (failed candidates) are never on
the front and never count towards a hypervolume.

Reference point (fixed per study). A hypervolume is only comparable over time if its reference point
never moves, so a study computes it once and stores it:

* from known bounds when every objective has them (accuracies in [0, 1], a bounded cost):
  :func:`reference_point_from_bounds` takes the worst end of each objective's range and moves it
  ``margin`` times the range further out;
* otherwise from the first results (the driver uses its first completed batch, e.g. the first
  generation): :func:`reference_point` takes the per-objective worst (nadir) of those rows and moves it
  ``margin`` times the spread (max - min) further out, or ``margin * max(1, |worst|)`` where the spread
  is zero. Later points worse than the reference point in some objective contribute nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.search.base import normalize_directions


def _directions_signs(directions: Sequence[str]) -> np.ndarray:
    return np.array([-1.0 if d == "maximize" else 1.0 for d in normalize_directions(directions)])


def to_minimization(values: Any, directions: Sequence[str]) -> np.ndarray:
    """``(n, m)`` float array with maximised objectives negated; ``None`` rows or entries become NaN."""
    signs = _directions_signs(directions)
    m = len(signs)
    rows = list(values) if not isinstance(values, np.ndarray) else values
    if isinstance(rows, np.ndarray):
        F = np.asarray(rows, dtype=float)
    else:
        F = np.full((len(rows), m), np.nan)
        for i, r in enumerate(rows):
            if r is None:
                continue
            F[i] = [np.nan if v is None else float(v) for v in r]
    F = F.reshape(-1, m) if F.size else np.empty((0, m))
    return F * signs


def _finite_rows(F: np.ndarray) -> np.ndarray:
    F = np.asarray(F, dtype=float)
    if F.ndim != 2:
        raise ValueError(f"expected a 2-D array (n, m), got shape {F.shape}")
    return np.all(np.isfinite(F), axis=1)


def non_dominated(F: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``F`` (minimisation) that no other row dominates.

    Row a dominates row b when a <= b in every objective and a < b in at least one. Identical rows do
    not dominate each other (both stay). Rows with NaN/inf are excluded (False) and dominate nothing.
    """
    F = np.asarray(F, dtype=float)
    if F.ndim == 1:
        F = F.reshape(-1, 1)
    ok = _finite_rows(F)
    mask = np.zeros(len(F), dtype=bool)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return mask
    G = F[idx]
    # dominated[j] = any i: all(G[i] <= G[j]) and any(G[i] < G[j]); chunked to bound memory
    dominated = np.zeros(len(G), dtype=bool)
    chunk = max(1, 2_000_000 // max(1, len(G) * G.shape[1]))
    for s in range(0, len(G), chunk):
        A = G[s: s + chunk, None, :]  # candidates dominators
        le = np.all(A <= G[None, :, :], axis=2)
        lt = np.any(A < G[None, :, :], axis=2)
        dominated |= np.any(le & lt, axis=0)
    mask[idx] = ~dominated
    return mask


def reference_point(F_min: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """A reference point just worse than every finite row of ``F_min`` (compute once per study, store)."""
    F = np.asarray(F_min, dtype=float)
    if F.ndim == 1:
        F = F.reshape(1, -1)
    F = F[_finite_rows(F)]
    if len(F) == 0:
        raise ValueError("reference_point: no finite rows to derive it from")
    worst, best = F.max(axis=0), F.min(axis=0)
    spread = worst - best
    pad = np.where(spread > 0, spread, np.maximum(1.0, np.abs(worst))) * float(margin)
    return worst + pad


def reference_point_from_bounds(bounds: Sequence[tuple[float, float]], directions: Sequence[str],
                                margin: float = 0.1) -> np.ndarray:
    """Reference point in minimisation form from each objective's known ``(low, high)`` range."""
    signs = _directions_signs(directions)
    if len(bounds) != len(signs):
        raise ValueError(f"{len(bounds)} bounds for {len(signs)} objectives")
    ref = []
    for (lo, hi), s in zip(bounds, signs, strict=True):
        lo, hi = float(lo), float(hi)
        if not hi > lo:
            raise ValueError(f"bounds ({lo}, {hi}): high must exceed low")
        worst = -lo if s < 0 else hi  # maximise: worst is low (negated); minimise: worst is high
        ref.append(worst + float(margin) * (hi - lo))
    return np.array(ref)


def hypervolume(F_min: np.ndarray, ref: Sequence[float], front: bool = False) -> float:
    """Hypervolume (pymoo's ``HV``) dominated by the finite rows of ``F_min`` and bounded by ``ref``.

    Rows not strictly better than ``ref`` in every objective contribute nothing; an empty set gives 0.
    ``front=True``: the caller knows no row dominates another, and the quadratic filter is skipped.
    """
    from pymoo.indicators.hv import HV  # pymoo loads with the first hypervolume, not with the CLI or the store

    ref = np.asarray(ref, dtype=float).reshape(-1)
    F = np.asarray(F_min, dtype=float)
    if F.size == 0:
        return 0.0
    F = F.reshape(-1, len(ref))
    F = F[_finite_rows(F)]
    F = F[np.all(F < ref, axis=1)]
    if len(F) == 0:
        return 0.0
    if not front:
        F = F[non_dominated(F)]
    return float(HV(ref_point=ref)(F))


def pareto_front_table(keys: Sequence[int], values: Any, directions: Sequence[str],
                       names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows ``{"key": k, <objective name>: value, ...}`` of the front, in the user's units.

    ``values`` holds one row per key (``None`` for failed candidates). Sorted by the first objective,
    best first; identical duplicates are all listed.
    """
    F = to_minimization(values, directions)
    if len(keys) != len(F):
        raise ValueError(f"{len(keys)} keys for {len(F)} value rows")
    names = list(names) if names is not None else [f"f{i}" for i in range(F.shape[1])]
    mask = non_dominated(F) if len(F) else np.zeros(0, dtype=bool)
    idx = np.flatnonzero(mask)
    idx = idx[np.lexsort(tuple(F[idx, j] for j in reversed(range(F.shape[1]))))] if len(idx) else idx
    signs = _directions_signs(directions)
    return [{"key": int(keys[i]), **{n: float(F[i, j] * signs[j]) for j, n in enumerate(names)}}
            for i in idx]
