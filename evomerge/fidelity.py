"""Multi-fidelity evaluation: score a first slice of each objective's examples, finish only candidates
that can still reach the front.

After k of n examples with mean score m (per-example scores in [0, 1]), the full score lies in
[m·k/n, (m·k + n − k)/n] for sure ("safe"), and, treating the k examples as a sample of the n,
below m + sqrt(ln(1/δ) / 2k) with probability 1 − δ (Hoeffding, "hoeffding"). A candidate is stopped
when even its optimistic scores are dominated by a member of the current front; its slice scores are
recorded (dominated too, so the front never changes because of a pruned candidate) with the fidelity
in its timings, and the algorithm is told them like any result.

``method: anchors`` replaces the first slice by a small informative subset, in the spirit of
tinyBenchmarks (Polo et al. 2024) and MERGE³ (Mencattini et al. 2025): once ``min_reference`` candidates
of the study are fully scored, their per-example scores say how the examples behave (each example's
score across those candidates: its difficulty, and which examples succeed and fail together). The
examples are clustered by that pattern (k-means, k = ``fraction`` of them); the example nearest each
cluster's centre is its anchor. Each example's difficulty is the log-odds of failing it among those
candidates (a Rasch model). A new candidate is scored on the anchors only; its ability is fitted to its
anchor scores and its full score estimated as the anchors' scores plus every other example's predicted
probability of success (tinyBenchmarks' p-IRT; on synthetic item-response data it beat the
cluster-weighted anchor mean by about 20%, on the demo's merges with few reference candidates it did
not). Both estimators are cross-validated on the fully scored candidates (anchors and difficulties
learned without the candidates they estimate); the plan uses the one with the lower root-mean-square
error, and that error is the estimate's error bar. A candidate whose estimate plus ``z`` error bars could still
reach the front is scored on the remaining examples too, so every front member is fully scored; the
others keep their estimate (dominated by the front, so the front is unchanged by them), with the error
bar in their timings.

A negative ``z`` is the cheap end of that trade-off: a candidate is finished only when its estimate passes
the front by ``-z`` error bars. NSGA-II's children sit so close to its front that most estimates could
reach it, and finishing them all scores most examples; with ``z < 0`` the near misses keep their estimate.
Such an estimate may lie beyond the front, so an estimated candidate is never a front member, nor counted
in the best scores or the hypervolume (``CandidateRow.estimated``): the front is always fully scored.

``confirm`` adds a second stage between the anchors and the finish: a larger anchor subset holding the
first (fitted the same way, every example counting toward its nearest anchor), estimated by its weighted
anchor mean with a cross-validated error bar (not the Rasch fit, whose prior and difficulties pull the
candidates beyond the reference ones, those the finish decides on, back toward them). The anchors'
estimate only screens (it needs half of ``min_gain``); the finish is decided on the larger subset's tighter
estimate, so fewer of the candidates that would move the front are left as estimates, and the estimates the
algorithm is told of the near misses are closer to their scores.

``confirm_steps`` reaches that subset in steps: the anchors plus the heaviest of its other anchors (the
largest clusters) first, each step gated like the anchors on its own estimate and error bar, so a near miss
that a few more examples rule out stops there instead of paying for the whole confirm subset (on the demo,
two steps finished as many candidates as one for 14% of each candidate's examples instead of 16%).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge import front as frontlib


class MultiFidelity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # "racing": a first slice with a confidence bound; "anchors": an informative subset, estimated.
    method: Literal["racing", "anchors"] = "racing"
    # Share of each objective's examples scored before deciding whether to finish (the slice, the anchors).
    fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    bound: Literal["safe", "hoeffding"] = "hoeffding"
    delta: float = Field(default=0.05, gt=0.0, lt=1.0)
    # anchors: fully scored candidates needed before estimating (every candidate is scored fully until then)
    min_reference: int = Field(default=8, ge=4, le=100_000)
    # anchors: a candidate is finished when its estimate plus z error bars could reach the front
    # (below 0: finished only when the estimate passes the front by -z error bars; the others stay estimates,
    # which are no results: never on the front, nor in the best scores or the hypervolume)
    z: float = Field(default=2.0, ge=-5.0, le=100.0)
    # a candidate is finished only when its optimistic scores would add at least this share of the front's
    # hypervolume (0: whenever they are not dominated). With three or more objectives most of NSGA-II's
    # children are non-dominated by a sliver; finishing only those that move the front keeps the cost down.
    min_gain: float = Field(default=0.0, ge=0.0, lt=1.0)
    # anchors: a second, larger anchor subset (the first plus this share's worth of clusters) that a candidate
    # passing the first gate is scored on before the finish decision, which is then made on its tighter
    # estimate with ``confirm_z`` error bars; the first gate asks half of ``min_gain``. None: one stage.
    confirm: float | None = Field(default=None, gt=0.0, lt=1.0)
    confirm_z: float = Field(default=0.0, ge=-5.0, le=100.0)
    # anchors: the confirm subset reached in this many nested steps (the anchors plus the heaviest of its other
    # anchors first), each before the last gated like the anchors (``z``, half of ``min_gain``) on its own,
    # tighter estimate: a candidate a few more examples rule out stops there, not after the whole subset.
    confirm_steps: int = Field(default=1, ge=1, le=10)

    @model_validator(mode="after")
    def _confirm_is_larger(self) -> MultiFidelity:
        if self.confirm is not None and (self.method != "anchors" or self.confirm <= self.fraction):
            raise ValueError(f"confirm ({self.confirm}) is a second, larger anchor subset: it needs method: anchors "
                             f"and a share above fraction ({self.fraction})")
        if self.confirm_steps > 1 and self.confirm is None:
            raise ValueError(f"confirm_steps ({self.confirm_steps}) splits the confirm subset: it needs confirm")
        return self


def optimistic_value(samples: list[float], n_total: int, direction: str, fid: MultiFidelity) -> float:
    """The best full score an objective can still reach, given its first per-example scores."""
    k = len(samples)
    if k >= n_total:
        return float(np.mean(samples))
    mean = float(np.mean(samples))
    if fid.bound == "safe":
        hi = (mean * k + (n_total - k)) / n_total
        lo = mean * k / n_total
    else:
        eps = math.sqrt(math.log(1.0 / fid.delta) / (2.0 * k))
        hi, lo = min(1.0, mean + eps), max(0.0, mean - eps)
    return hi if direction == "maximize" else lo


def can_reach_front(optimistic: list[float], front: list[list[float]], directions: list[str],
                    min_gain: float = 0.0, reference: list[float] | None = None) -> bool:
    """False when some front member dominates even the optimistic scores, or (``min_gain`` > 0, with the
    study's hypervolume ``reference`` point in minimization form) when they would add less than
    ``min_gain`` of the front's hypervolume."""
    if not front:
        return True
    F = frontlib.to_minimization(front, directions)
    o = frontlib.to_minimization([optimistic], directions)[0]
    dominated = np.all(F <= o, axis=1) & np.any(F < o, axis=1)
    if dominated.any():
        return False
    if min_gain <= 0.0 or reference is None:
        return True
    hv = frontlib.hypervolume(F, reference)
    return hv <= 0.0 or frontlib.hypervolume(np.vstack([F, o]), reference) - hv >= min_gain * hv


# ------------------------------------------------------------------------------------ anchor subsets
def _kmeans(X: np.ndarray, k: int, seed: int, iters: int = 25) -> np.ndarray:
    """Cluster labels of the rows of ``X`` (k-means, k-means++ start, seeded: the same data, the same labels)."""
    rng = np.random.default_rng(seed)
    n = len(X)
    centres = [X[int(rng.integers(n))]]
    for _ in range(1, k):
        d2 = np.min(((X[:, None, :] - np.asarray(centres)[None, :, :]) ** 2).sum(axis=2), axis=1)
        total = float(d2.sum())
        centres.append(X[int(rng.choice(n, p=d2 / total))] if total > 0 else X[int(rng.integers(n))])
    C = np.asarray(centres, dtype=float)
    labels = np.zeros(n, dtype=int)
    for it in range(iters):
        new = np.argmin(((X[:, None, :] - C[None, :, :]) ** 2).sum(axis=2), axis=1)
        if it > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if np.any(labels == j):
                C[j] = X[labels == j].mean(axis=0)
    return labels


def _nearest_weights(X: np.ndarray, order: list[int]) -> list[float]:
    """Each anchor's weight when every example (a row of ``X``) counts toward the anchor nearest it."""
    near = np.argmin(((X[:, None, :] - X[order][None, :, :]) ** 2).sum(axis=2), axis=1)
    return [float(v) for v in np.bincount(near, minlength=len(order)) / len(X)]


def fit_anchors(S: np.ndarray, k: int, seed: int = 0, keep: list[int] | None = None) -> tuple[list[int], list[float]]:
    """Anchor examples and their weights from ``S`` (reference candidates x examples, scores in [0, 1]):
    examples clustered by their scores across the candidates, the one nearest each centre its anchor,
    weighted by its cluster's share of the examples. With ``keep`` (a first stage's anchors) those are
    anchors too (up to ``k`` + len(keep) in all), and every example counts toward the anchor nearest it.
    Anchors come back ascending; the k clusters give fewer when fewer distinct patterns exist (m reference
    candidates give at most 2^m)."""
    S = np.asarray(S, dtype=float)
    n = S.shape[1]
    if k >= n:
        return list(range(n)), [1.0 / n] * n
    X = S.T  # one row per example: how each reference candidate did on it
    labels = _kmeans(X, k, seed)
    picks: dict[int, float] = {}
    for j in np.unique(labels):
        members = np.flatnonzero(labels == j)
        centre = X[members].mean(axis=0)
        nearest = int(members[np.argmin(((X[members] - centre) ** 2).sum(axis=1))])
        picks[nearest] = picks.get(nearest, 0.0) + len(members) / n
    if keep is not None:
        order = sorted(set(picks) | {int(i) for i in keep})
        return order, _nearest_weights(X, order)
    order = sorted(picks)
    return order, [picks[i] for i in order]


def estimate_from_anchors(anchor_scores: list[float], weights: list[float]) -> float:
    """The cluster-weighted anchor mean (tinyBenchmarks' plain anchor-point estimate)."""
    return float(np.dot(np.asarray(anchor_scores, dtype=float), np.asarray(weights, dtype=float)))


def item_difficulty(S: np.ndarray) -> np.ndarray:
    """Rasch difficulty of each example from the reference candidates' scores: the log-odds of failing it
    (counts smoothed by half an example, so an example nobody or everybody solved stays finite)."""
    S = np.asarray(S, dtype=float)
    p = (S.sum(axis=0) + 0.5) / (S.shape[0] + 1.0)
    return np.log1p(-p) - np.log(p)


def estimate_irt(anchor_scores: list[float], indices: list[int], difficulty: list[float]) -> float:
    """Full-score estimate under a Rasch model (tinyBenchmarks' p-IRT): the candidate's ability is fitted to
    its anchor scores (maximum a posteriori, prior N(0, 2^2)), each other example counts its predicted
    probability of success, each anchor its observed score."""
    b = np.asarray(difficulty, dtype=float)
    idx = np.asarray(indices, dtype=int)
    s = np.asarray(anchor_scores, dtype=float)
    theta = 0.0
    for _ in range(50):
        q = 1.0 / (1.0 + np.exp(-(theta - b[idx])))
        step = (np.sum(s - q) - theta / 4.0) / (np.sum(q * (1.0 - q)) + 0.25)
        theta += step
        if abs(step) < 1e-9:
            break
    pred = 1.0 / (1.0 + np.exp(-(theta - b)))
    pred[idx] = s
    return float(pred.mean())


def estimate(entry: dict, anchor_scores: list[float]) -> float:
    """An objective's full-score estimate from its anchor scores and its plan entry (``plan_anchors``)."""
    if entry.get("difficulty") is not None:
        return estimate_irt(anchor_scores, entry["indices"], entry["difficulty"])
    return estimate_from_anchors(anchor_scores, entry["weights"])


def _fit_stages(S: np.ndarray, ks: list[int], seed: int, share: float = 1.0) -> tuple[list[int], list[float]]:
    """The last of nested anchor subsets of sizes ``ks`` (each holding the one before); with ``share`` < 1
    only the first subset and that share of the last one's other anchors, the heaviest, every example
    counting toward its nearest kept anchor."""
    first, w = fit_anchors(S, ks[0], seed)
    idx = first
    for k in ks[1:]:
        idx, w = fit_anchors(S, k, seed, keep=idx)
    if share >= 1.0:
        return idx, w
    extra = sorted((i for i in idx if i not in first), key=lambda i: -w[idx.index(i)])
    order = sorted({*first, *extra[: round(share * len(extra))]})
    return order, _nearest_weights(np.asarray(S, dtype=float).T, order)


def anchor_errors(S: np.ndarray, k: int | list[int], seed: int = 0, folds: int = 4,
                  share: float = 1.0) -> dict[str, float]:
    """Root-mean-square error of each estimator (``irt``, ``mean``) of a candidate's mean score,
    cross-validated over the reference candidates (anchors and difficulties learned without the fold they
    estimate); at least half an example. A list ``k``: the last of nested subsets, the earlier ones refitted
    per fold too (``share``: as in :func:`_fit_stages`)."""
    S = np.asarray(S, dtype=float)
    m, n = S.shape
    ks = [k] if isinstance(k, int) else list(k)
    folds = max(2, min(folds, m))
    errs: dict[str, list[float]] = {"irt": [], "mean": []}
    for f in range(folds):
        held = np.arange(m) % folds == f
        if held.all() or not held.any():
            continue
        idx, w = _fit_stages(S[~held], ks, seed, share)
        b = list(item_difficulty(S[~held]))
        truth = S[held].mean(axis=1)
        errs["irt"].extend(np.array([estimate_irt(list(r[idx]), idx, b) for r in S[held]]) - truth)
        errs["mean"].extend(S[held][:, idx] @ np.asarray(w) - truth)
    return {name: max(float(np.sqrt(np.mean(np.square(e)))) if e else 1.0, 0.5 / n) for name, e in errs.items()}


def _stage(S: np.ndarray, ks: list[int], seed: int, choose: bool = True, share: float = 1.0) -> dict:
    idx, w = _fit_stages(S, ks, seed, share)
    errors = anchor_errors(S, ks, seed, share=share)
    # the estimator that did better on the study's own candidates (``choose``), else the weighted mean
    irt = choose and errors["irt"] < errors["mean"]
    return {"indices": idx, "weights": w, "n": S.shape[1], "estimator": "irt" if irt else "mean",
            "difficulty": [float(v) for v in item_difficulty(S)] if irt else None,
            "error": errors["irt" if irt else "mean"]}


def plan_anchors(samples: dict[str, np.ndarray], fraction: float, seed: int = 0,
                 confirm: float | None = None, confirm_steps: int = 1) -> dict[str, dict]:
    """Per objective: its anchors, their weights and the estimate's error bar, as plain data for a worker.
    ``samples`` maps an objective to its reference matrix (fully scored candidates x examples). With
    ``confirm``, each entry holds under ``"confirm"`` a second entry of the same form: the larger subset
    (the first plus the anchors of that share of the examples' worth of clusters), estimated by its weighted
    mean, with its error bar. ``confirm_steps`` > 1 adds under ``"between"`` the entries of the subsets on
    the way there: the anchors plus 1/steps, 2/steps, ... of the confirm subset's other anchors, the heaviest."""
    plan = {}
    for name, S in samples.items():
        S = np.clip(np.nan_to_num(np.asarray(S, dtype=float), nan=0.0), 0.0, 1.0)
        n = S.shape[1]
        k = max(1, min(n, math.ceil(fraction * n)))
        plan[name] = _stage(S, [k], seed)
        if confirm is not None:
            # The weighted mean, not the Rasch fit: cross-validation rates the two on the reference candidates,
            # but the finish decides on candidates beyond them, which the fit's prior and difficulties pull
            # back toward them (on the demo the mean left fewer front members as estimates, at lower cost).
            ks = [k, max(k, min(n, math.ceil(confirm * n)))]
            plan[name]["confirm"] = _stage(S, ks, seed, choose=False)
            if confirm_steps > 1:
                plan[name]["between"] = [_stage(S, ks, seed, choose=False, share=i / confirm_steps)
                                         for i in range(1, confirm_steps)]
    return plan


def estimate_bounds(estimate: float, error: float, z: float, direction: str) -> float:
    """The optimistic end of an anchor estimate's error bar (clipped to [0, 1])."""
    v = estimate + z * error if direction == "maximize" else estimate - z * error
    return float(min(1.0, max(0.0, v)))
