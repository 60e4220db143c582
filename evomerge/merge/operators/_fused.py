"""What a fused kernel call needs for one layer group: the :class:`Plan` an operator's spec returns.

The kernels themselves live in :mod:`evomerge.merge.kernels` (torch.compile) and
:mod:`evomerge.merge.native` (C); an operator with a fast path declares ``fused=`` in its spec, a
function of ``(params, weights, densities, drawn)`` returning a :class:`Plan` (or ``None`` where the
eager operator must run), so the kernels never switch on operator names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.merge._torch import torch

if TYPE_CHECKING:
    from torch import Tensor


__all__ = ["Plan", "KERNELS", "divisor", "inverse_rescale", "ta_plan"]

#: the fused kernels a plan can name (each has a compiled body, and all but ``della`` a C op code).
KERNELS = ("ta", "ties", "dare", "dare_ties", "della")


@dataclass(frozen=True)
class Plan:
    """One fused kernel call's arguments for one set of genes (a layer group): the same for every
    tensor of the group, but for the per-tensor magnitude thresholds and draw keys."""

    kernel: str  # one of KERNELS
    coef: Tensor  # K float32: the task vectors' factors (ta, dare, dare_ties, della)
    w: Tensor  # K float32: the TIES weights, what normalize sums
    lam: float  # lambda (ties, dare_ties, della)
    bscale: float  # the base's factor (ta)
    normalize: bool
    below: Tensor | None = None  # K int32: the draws' keep thresholds (dare, dare_ties)
    trim: bool = False  # ties: per-tensor magnitude thresholds (else every entry is kept)
    inverse: bool = False  # della: the 1/p rescale (DARE's is folded into coef)
    elect: bool = True  # della: TIES election and disjoint merge (False: task arithmetic)

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown fused kernel {self.kernel!r}")


def divisor(params: dict[str, Any], c: Tensor) -> float:
    """What ``normalize`` divides by: the coefficients' sum, unless it is (near) zero."""
    t = float(c.sum())
    return t if params.get("normalize", False) and abs(t) >= 1e-8 else 1.0


def ta_plan(params: dict[str, Any], w: Tensor, coef: Tensor, bscale: float = 1.0) -> Plan:
    """A task-arithmetic kernel call: ``bscale * base + sum_i coef_i * tau_i``."""
    return Plan("ta", coef, w, float(params.get("lambda", 1.0)), bscale, bool(params.get("normalize", False)))


def ties_plan(params: dict[str, Any], w: Tensor, kernel: str = "ties", **kw: Any) -> Plan:
    """A TIES-family kernel call (election and disjoint merge of ``coef_i * tau_i``)."""
    lam = kw.pop("lam", float(params.get("lambda", 1.0)))
    return Plan(kernel, kw.pop("coef", w), w, lam, 1.0, bool(params.get("normalize", False)), **kw)


def inverse_rescale(params: dict[str, Any]) -> bool | None:
    """For the random-drop operators: whether ``rescale`` is the 1/p rule, ``None`` for mergekit's L1
    rule (which needs a reduction over the tensor: no fused kernel)."""
    r = params.get("rescale")
    if r is True or r == "l1":
        return None
    return r in ("inverse", "1/density", "inv")


def zero_where_dropped(w: Tensor, dens: Tensor) -> Tensor:
    """DARE's 1/p rescale folded into the weights (0 where the density is 0)."""
    return torch.where(dens > 0, w / dens.clamp(1e-12, 1.0), torch.zeros_like(w))
