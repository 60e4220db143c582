"""SCE (FuseChat 2.0, Wan et al. 2024): select by variance, calculate weights, erase sign conflicts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.merge._torch import torch
from evomerge.merge.operators import OperatorSpec, register
from evomerge.merge.operators._common import _bcast, _finish, _prep

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["sce", "sce_mask"]


def sce_mask(deltas: Tensor, select_topk: float) -> Tensor:
    """The entries SCE keeps (float 0/1, the shape of one task vector): the ``int(select_topk * n)`` of
    largest variance across the sources, ``n`` the number of entries whose variance is not 0."""
    topk = round(float(select_topk), 7)  # a float32 gene counts like mergekit's Python float
    if topk >= 1:
        return torch.ones_like(deltas[0])
    mask = torch.zeros_like(deltas[0])
    if topk <= 0:
        return mask
    var = deltas.var(0, unbiased=False).reshape(-1)
    keep = int(int(torch.count_nonzero(var)) * topk)
    if keep:
        mask.view(-1)[torch.topk(var.abs(), keep).indices] = 1
    return mask


def sce(base, deltas, weights=None, densities=None, *, select_topk: float = 1.0, workspace=None, **_: Any) -> Tensor:
    """SCE as mergekit 0.1.5's ``sce``: per tensor,

    1. Select: keep the ``select_topk`` fraction of entries whose task vectors vary most across the
       sources (one mask for all sources, see :func:`sce_mask`); 1 keeps every entry.
    2. Calculate: source t's weight is the mean square of its selected task vector, over their sum (equal
       weights when that sum is below 1e-6).
    3. Erase: elect the sign of the sum of the task vectors per entry (>= 0 elects +); an entry of a
       source counts where its sign is the elected one (zeros never do); the merged task vector is the
       weighted mean of the counted entries (the weight sum clamped to at least 1e-6).

    The weights are computed from the task vectors, so the recipe's weights and densities are not used;
    the gene is ``select_topk`` (a layer group may override it). Needs the whole tensor (a top-k).
    """
    b, d, _, _ = _prep(base, deltas, None, None)
    k = d.shape[0]
    if k == 0:
        return base.clone()
    d = d * sce_mask(d, select_topk)
    energy = d.square().reshape(k, -1).mean(1)
    total = float(energy.sum())
    w = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1.0 / k)
    elected = torch.where(d.sum(0) >= 0, 1.0, -1.0).to(d.dtype)
    kept = (torch.sign(d) == elected).to(d.dtype) * _bcast(w, d)
    merged = (d * kept).sum(0) / kept.sum(0).clamp(min=1e-6)
    return _finish(b + merged, base, None)


register(
    OperatorSpec(
        "sce",
        sce,
        (),
        {"select_topk": 1.0},
        group_params=("select_topk",),
        param_bounds={"select_topk": (0.0, 1.0)},
        context=frozenset({"whole"}),
        min_sources=1,
        mergekit_inputs={"weight": ("weight", 1.0)},
        mergekit_method="sce",
        mergekit_defaults={"select_topk": 1.0},
        description="select high-variance entries, weight by task-vector energy, erase sign conflicts",
    )
)

