"""PCB-merging: parameter competition balancing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.merge._torch import torch
from evomerge.merge.operators import OperatorSpec, register
from evomerge.merge.operators._common import _finish, _prep

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["pcb"]


def _minmax(x: Tensor, dim: int) -> Tensor:
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _clamp_quantile(x: Tensor, lo_ratio: Tensor | float, hi_ratio: float) -> Tensor:
    """Clamp each row of ``x`` (K x n) to its sorted values at ``int(n lo_ratio)`` and
    ``int(n (1 - hi_ratio)) - 1`` (the PCB reference code's ``clamp``)."""
    k, n = x.shape
    s = torch.sort(x, dim=1).values
    lo_r = torch.as_tensor(lo_ratio, dtype=torch.float64).reshape(-1).expand(k)
    lo_i = torch.tensor([min(n - 1, max(0, int(n * float(r)))) for r in lo_r])
    hi_i = min(n - 1, max(0, int(n * (1 - hi_ratio)) - 1))
    lo = s.gather(1, lo_i.view(k, 1).to(s.device))
    hi = s[:, hi_i : hi_i + 1]
    return torch.minimum(torch.maximum(x, lo), torch.maximum(hi, lo))


def pcb(base, deltas, weights, densities=None, *, workspace=None, outlier: float = 1e-4, **params: Any) -> Tensor:
    """PCB-merging (Du et al. 2024, parameter competition balancing), per tensor.

    After the authors' reference code, on the flattened tensor with task vectors ``tau_t`` (scaled by
    their weights): clip each source's |tau| at its ``outlier`` quantiles; intra-balancing
    ``exp(K * minmax(|tau_t|)^2)``; inter-balancing ``tanh(tau_t * sum_s tau_s)``; their product is the
    score; scores below each source's ``1 - density`` quantile are raised to it and min-max normalised
    (so the bottom ``1 - density`` get 0: the drop); the merge is the score-weighted mean of the clipped
    task vectors, scaled by ``lambda``. The reference code ranks over the whole model at once and uses
    one ratio for all tasks; evomerge works per tensor and takes the ratio per source (the density
    gene). Min-max divisions by zero give 0 (the reference would give NaN).
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    k = d.shape[0]
    if k == 0 or b.numel() == 0:
        return base.clone()
    x = d.reshape(k, -1) * w.view(k, 1)
    ab = _clamp_quantile(x.abs(), float(outlier), float(outlier))
    clipped = torch.sign(x) * ab
    self_pcb = torch.exp(k * _minmax(ab, 1) ** 2)
    cross = torch.tanh(x * x.sum(0, keepdim=True))
    score = self_pcb * cross
    scale = _minmax(_clamp_quantile(score, (1 - dens.clamp(0, 1)).tolist(), 0.0), 1)
    merged = (clipped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    out = b + float(params.get("lambda", 1.0)) * merged.reshape(b.shape)
    return _finish(out, base, None)


register(
    OperatorSpec(
        "pcb",
        pcb,
        ("weight", "density"),
        {"lambda": 1.0, "outlier": 1e-4},
        context=frozenset({"whole"}),
        description="parameter competition balancing",
    )
)

