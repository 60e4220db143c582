"""Consensus merging with TALL masks over a base merge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from evomerge.merge._torch import torch
from evomerge.merge.operators import OperatorSpec, register
from evomerge.merge.operators._common import _bcast, _stack, _vec, _work_dtype
from evomerge.merge.operators._wrap import WRAP, _base_merge

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["consensus"]


def consensus(
    base,
    deltas,
    weights,
    densities=None,
    *,
    k: int = 2,
    mask_lambda: float | Sequence[float] = 0.4,
    base_method: str = "task_arithmetic",
    base_params: dict | None = None,
    workspace=None,
    **kw: Any,
) -> Tensor:
    """Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information...").

    ``tau_MTL = sum_t tau_t`` (unweighted, as the paper); source t's TALL mask is
    ``|tau_t| >= lambda_t |tau_MTL - tau_t|`` (``mask_lambda``: one value or one per source); entries
    where at least ``k`` masks are set keep the ``base_method`` merge, the others fall back to the base.
    ``k <= 0`` returns the base merge exactly. Elementwise, so it streams in chunks like its base merge.
    """
    merged = _base_merge(base_method, base_params, base, deltas, weights, densities, kw)
    if int(k) <= 0:
        return merged
    dt = _work_dtype(base)
    d = _stack(deltas, base, dt)
    kk = d.shape[0]
    lam = _vec(
        mask_lambda if isinstance(mask_lambda, (list, tuple, torch.Tensor)) else [float(mask_lambda)] * kk,
        kk,
        dt,
        d.device,
        0.4,
    )
    mtl = d.sum(0)
    count = (d.abs() >= _bcast(lam, d) * (mtl - d).abs()).sum(0)
    return torch.where(count >= int(k), merged, base.to(merged.dtype))


register(
    OperatorSpec(
        "consensus",
        consensus,
        ("weight", "density"),
        {"k": 2, "mask_lambda": 0.4, **WRAP},
        group_params=("k",),
        param_bounds={"k": lambda n: (0, n)},
        description="base merge kept where >= k TALL masks agree",
    )
)

