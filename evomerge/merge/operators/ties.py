"""TIES-merging: magnitude trim, sign election, disjoint merge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.merge.operators import REQUIRED, OperatorSpec, register
from evomerge.merge.operators._common import (
    Workspace,
    _bcast,
    _buf,
    _finish,
    _magnitude_mask,
    _prep,
    _ties_combine,
    magnitude_thresholds,
)
from evomerge.merge.operators._fused import Plan, ties_plan

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["ties"]


def ties(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    thresholds=None,
    noise=None,
    workspace: Workspace | None = None,
    normalize: bool = True,
    **params: Any,
) -> Tensor:
    """TIES-merging (Yadav et al. 2023) as mergekit 0.1.5's ``ties``.

    1. Trim: per tensor and per source keep the ``max(1, int(density * numel))`` entries of largest
       |tau| (per-tensor top-k, as mergekit; the paper trims the whole model at once). No rescale.
    2. Elect: the sign of ``sum_t w_t * trim(tau_t)`` per entry (>= 0 elects +).
    3. Disjoint merge: sum the weighted entries that agree with the elected sign and, with
       ``normalize`` (default true), divide by the sum of the weights of the agreeing entries (so with
       equal weights this is the paper's disjoint mean); then scale by ``lambda``.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0] == 0:
        return base.clone()
    if thresholds is None:
        thresholds = magnitude_thresholds(d, dens)
    wd = _magnitude_mask(d, thresholds, _buf(workspace, "A", d.shape, d)).mul_(d).mul_(_bcast(w, d))
    out = _ties_combine(b, wd, w, bool(normalize), float(params.get("lambda", 1.0)), workspace)
    return _finish(out, base, workspace)


def _plan(params: dict[str, Any], w: Tensor, dens: Tensor, drawn: bool) -> Plan:
    return ties_plan(params, w, trim=True)


register(
    OperatorSpec(
        "ties",
        ties,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": True},
        sparsify="magnitude",
        mergekit_method="ties",
        mergekit_defaults={"normalize": True, "rescale": False, "lambda": 1.0},
        mergekit_inputs={"weight": ("weight", REQUIRED), "density": ("density", 1.0)},
        fused=_plan,
        description="magnitude trim, sign election, disjoint merge",
    )
)

