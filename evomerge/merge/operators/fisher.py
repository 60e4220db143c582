"""Fisher-weighted averaging: needs each source's diagonal Fisher, computed from data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from evomerge.merge._torch import torch
from evomerge.merge.operators import OperatorSpec, register
from evomerge.merge.operators._common import _bcast, _finish, _prep, _stack

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["fisher"]


def fisher(
    base,
    deltas,
    weights,
    densities=None,
    *,
    fisher: Tensor | Sequence[Tensor] | None = None,
    fisher_floor: float = 1e-12,
    workspace=None,
    **params: Any,
) -> Tensor:
    """Fisher-weighted averaging (Matena & Raffel 2022): ``sum_t w_t F_t theta_t / sum_t w_t F_t``.

    ``F_t`` is source t's diagonal Fisher (``K x shape``; the materializer computes and caches it with
    :meth:`Materializer.compute_fisher`), plus ``fisher_floor`` so an entry no source's data touched
    becomes the plain weighted average. Written as ``theta0 + sum w F tau / sum w F``; a zero divisor
    becomes 1 (base kept). Without ``fisher`` it is the weighted average (``linear``).
    """
    b, d, w, _ = _prep(base, deltas, weights, None)
    k = d.shape[0]
    if k == 0:
        return base.clone()
    F = torch.ones_like(d) if fisher is None else _stack(fisher, base, d.dtype)
    wf = (F + float(fisher_floor)) * _bcast(w, d)
    den = wf.sum(0)
    den = torch.where(den == 0, torch.ones_like(den), den)
    out = b + (wf * d).sum(0) / den
    return _finish(out, base, None)


register(
    OperatorSpec(
        "fisher",
        fisher,
        ("weight",),
        {"fisher_floor": 1e-12},
        context=frozenset({"fisher"}),
        description="Fisher-weighted average (needs Materializer.compute_fisher)",
    ),
    "fisher_merging",
)

