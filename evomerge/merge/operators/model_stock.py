"""Model Stock: the average moved towards the base by the task vectors' angle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.merge._torch import torch
from evomerge.merge.operators import OperatorSpec, register
from evomerge.merge.operators._common import _finish, _prep

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["model_stock", "model_stock_stats", "model_stock_linear"]


def model_stock_stats(base: Tensor, deltas: Tensor) -> Tensor:
    """Model Stock's mean pairwise cosine of the task vectors of one whole tensor (float64, shape 1)."""
    k = deltas.shape[0]
    rows = deltas.reshape(k, -1).float()
    norms = torch.linalg.vector_norm(rows, dim=-1)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            c = float(torch.dot(rows[i], rows[j])) / max(float(norms[i] * norms[j]), 1e-6)
            cos.append(min(1.0, max(-1.0, c)))
    return torch.tensor([sum(cos) / len(cos)], dtype=torch.float64)


def model_stock_linear(stats: Tensor, k: int) -> tuple[float, list[float]]:
    """Model Stock of one whole tensor as ``base + sum_i (t / k) tau_i`` from :func:`model_stock_stats`."""
    cos = float(stats[0])
    den = 1 + (k - 1) * cos
    t = 0.0 if abs(den) < 1e-6 else k * cos / den
    return 1.0, [t / k] * k


def model_stock(
    base, deltas, weights=None, densities=None, *, filter_wise: bool = False, workspace=None, **_
) -> Tensor:
    """Model Stock (Jang et al. 2024) as mergekit 0.1.5's ``model_stock``.

    With ``k >= 2`` fine-tuned models, ``cos`` is the mean over pairs of the cosine between their task
    vectors (per tensor, or per row with ``filter_wise``), ``t = k cos / (1 + (k - 1) cos)``, and the
    result is ``t * mean(theta_t) + (1 - t) * theta0 = theta0 + t * mean(tau_t)``. Where the denominator
    vanishes (|.| < 1e-6) the base is kept (t = 0), as mergekit. Weights and densities are not used.
    """
    b, d, _, _ = _prep(base, deltas, None, None)
    k = d.shape[0]
    if k < 2:
        raise ValueError("model_stock needs at least two source models")
    if filter_wise and b.dim() >= 1:
        rows = d.reshape(k, b.shape[0] if b.dim() >= 2 else 1, -1)
    else:
        rows = d.reshape(k, 1, -1)
    norms = torch.linalg.vector_norm(rows, dim=-1)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            c = (rows[i] * rows[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    cos_t = torch.stack(cos).mean(0).unsqueeze(-1)
    den = 1 + (k - 1) * cos_t
    sing = den.abs() < 1e-6
    tt = torch.where(sing, torch.zeros_like(cos_t), k * cos_t / torch.where(sing, torch.ones_like(den), den))
    avg = rows.mean(0)
    out = b + (tt * avg).reshape(b.shape)
    return _finish(out, base, None)


register(
    OperatorSpec(
        "model_stock",
        model_stock,
        (),
        {"filter_wise": False},
        context=frozenset({"whole"}),
        min_sources=2,
        stats=model_stock_stats,
        linear=lambda stats, k, filter_wise=False, **_: None if filter_wise else model_stock_linear(stats, k),
        mergekit_inputs={"weight": ("weight", 1.0)},
        mergekit_method="model_stock",
        mergekit_defaults={"filter_wise": False},
        description="average moved towards the base by the task vectors' angle",
    )
)

