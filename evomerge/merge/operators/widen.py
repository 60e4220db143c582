"""WIDEN: weight disentanglement merge (magnitude and direction ranked per layer)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.merge._torch import torch
from evomerge.merge.operators import OperatorSpec, register
from evomerge.merge.operators._common import _finish, _prep

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["widen"]


def _rank_significance(x: Tensor) -> Tensor:
    """Per row of ``x`` (K x n): position / n of each entry in ascending stable order (WIDEN's rank)."""
    k, n = x.shape
    order = torch.argsort(x, dim=1, stable=True)
    pos = (torch.arange(n, dtype=x.dtype, device=x.device) / n).expand(k, n).contiguous()
    return torch.zeros_like(x).scatter_(1, order, pos)


def _widen_scores(sig: Tensor, ratio: float, calibration: float) -> Tensor:
    scores = torch.softmax(sig, dim=0)
    mask = sig > sig.mean(dim=1, keepdim=True) * ratio
    return torch.where(mask, torch.full_like(scores, calibration), scores)


def widen(
    base,
    deltas,
    weights,
    densities=None,
    *,
    layer=None,
    name: str | None = None,
    workspace=None,
    above_average_ratio: float = 1.0,
    calibration: float = 1.0,
    **_: Any,
) -> Tensor:
    """WIDEN (Yu et al. 2024, weight disentanglement), after the authors' MergeLLM code.

    For a matrix (``out x in``; the token embedding is transposed first so its columns are tokens):
    per column, the magnitude change ``|‖W_t‖ - ‖W_0‖|`` and the direction change
    ``1 - cos(W_t, W_0)`` of each source; each is ranked within the source (position / n); importance
    scores are the softmax over sources of the ranks, set to ``calibration`` where a rank exceeds
    ``above_average_ratio`` times the source's mean rank; the merge adds ``sum_t w_t s_t tau_t`` with
    ``s_t`` the mean of the magnitude and direction scores, per column. Vectors (norms, biases) use
    ``|tau_t|`` itself as the significance, elementwise. Weights (1 in the paper) scale each source.
    """
    b, d, w, _ = _prep(base, deltas, weights, None)
    k = d.shape[0]
    if k == 0:
        return base.clone()
    ratio, cal = float(above_average_ratio), float(calibration)
    if b.dim() == 2:
        transpose = layer == "embed" or (name is not None and "embed" in name)
        B = b.t() if transpose else b
        D = d.transpose(1, 2) if transpose else d
        T = B.unsqueeze(0) + D
        m0 = torch.linalg.vector_norm(B, dim=0)
        mt = torch.linalg.vector_norm(T, dim=1)
        dm = (mt - m0).abs()
        dd = 1.0 - torch.cosine_similarity(T, B.unsqueeze(0).expand_as(T), dim=1)
        s = 0.5 * (
            _widen_scores(_rank_significance(dm), ratio, cal) + _widen_scores(_rank_significance(dd), ratio, cal)
        )
        merged = (D * (s * w.view(k, 1)).unsqueeze(1)).sum(0)
        out = B + merged
        out = out.t() if transpose else out
    else:
        flat = d.reshape(k, -1)
        s = _widen_scores(flat.abs(), ratio, cal)
        out = b + (flat * s * w.view(k, 1)).sum(0).reshape(b.shape)
    return _finish(out.contiguous(), base, None)


register(
    OperatorSpec(
        "widen",
        widen,
        ("weight",),
        {"above_average_ratio": 1.0, "calibration": 1.0},
        context=frozenset({"whole", "layer", "name"}),
        description="weight disentanglement merge",
    )
)

