"""Multi-fidelity evaluation: score a first slice of each objective's examples, finish only candidates
that can still reach the front.

After k of n examples with mean score m (per-example scores in [0, 1]), the full score lies in
[m·k/n, (m·k + n − k)/n] for sure ("safe"), and, treating the k examples as a sample of the n,
below m + sqrt(ln(1/δ) / 2k) with probability 1 − δ (Hoeffding, "hoeffding"). A candidate is stopped
when even its optimistic scores are dominated by a member of the current front; its slice scores are
recorded (dominated too, so the front never changes because of a pruned candidate) with the fidelity
in its timings, and the algorithm is told them like any result.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge import front as frontlib


class MultiFidelity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Share of each objective's examples scored before deciding whether to finish.
    fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    bound: Literal["safe", "hoeffding"] = "hoeffding"
    delta: float = Field(default=0.05, gt=0.0, lt=1.0)


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


def can_reach_front(optimistic: list[float], front: list[list[float]], directions: list[str]) -> bool:
    """False when some front member dominates even the optimistic scores."""
    if not front:
        return True
    F = frontlib.to_minimization(front, directions)
    o = frontlib.to_minimization([optimistic], directions)[0]
    dominated = np.all(F <= o, axis=1) & np.any(F < o, axis=1)
    return not bool(dominated.any())
