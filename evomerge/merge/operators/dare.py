"""DARE: random drop and rescale, then task arithmetic (``dare``) or TIES (``dare_ties``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.merge.draws import keep_threshold
from evomerge.merge.operators import REQUIRED, OperatorSpec, register
from evomerge.merge.operators._common import (
    Workspace,
    _bcast,
    _dare_sparsify,
    _finish,
    _prep,
    _ta_combine,
    _ties_combine,
)
from evomerge.merge.operators._fused import Plan, divisor, inverse_rescale, ta_plan, ties_plan, zero_where_dropped

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["dare", "dare_ties"]


def dare(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    thresholds=None,
    noise=None,
    workspace: Workspace | None = None,
    normalize: bool = False,
    rescale: Any = "inverse",
    **params: Any,
) -> Tensor:
    """DARE (Yu et al. 2023) followed by task arithmetic (mergekit's ``dare_linear``).

    Each entry of each task vector is kept with probability ``density`` (dropped with p = 1 - density),
    then rescaled:

    - ``rescale: inverse`` (evomerge's default): multiply the kept entries by ``1/density``, the
      paper's rule. It is unbiased entry by entry and needs no reduction over the tensor, so it stays a
      single streaming pass on the hot path, and it is a function of the density only (smooth for the
      search).
    - ``rescale: l1`` (or ``true``): mergekit 0.1.5's rule, scale each sparsified task vector so that its
      L1 norm equals the one before the drop. For large tensors it is within sampling noise of
      ``1/density``; use it to reproduce a mergekit config in distribution.
    - ``rescale: none`` (or ``false``): no rescale.

    The mask is ``u < density`` with ``u ~ U[0,1)`` drawn from ``generator`` (or given as ``noise``),
    so masks are nested across densities for a fixed seed. mergekit draws ``torch.bernoulli`` from the
    global RNG; the two agree in distribution, not bit for bit. When no density is below 1 nothing is
    drawn and the task vectors are used untouched, so DARE with density 1 is task arithmetic exactly.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0]:
        d, scale = _dare_sparsify(d, dens, generator, noise, rescale, workspace)
        w = w * scale
    out = _ta_combine(b, d, w, bool(normalize), float(params.get("lambda", 1.0)), workspace)
    return _finish(out, base, workspace)


def dare_ties(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    thresholds=None,
    noise=None,
    workspace: Workspace | None = None,
    normalize: bool = False,
    rescale: Any = "inverse",
    **params: Any,
) -> Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint merge (mergekit's ``dare_ties``).

    The drop and rescale are those of :func:`dare`; the election and merge those of :func:`ties`.
    mergekit's default is ``normalize: false`` for ``dare_ties`` (the agreeing weighted entries are
    summed, not averaged), and evomerge keeps it: the evolutionary-merge paper's best weights summed to
    about 2 under that convention. Set ``normalize: true`` for the disjoint mean.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0] == 0:
        return base.clone()
    d, scale = _dare_sparsify(d, dens, generator, noise, rescale, workspace)
    coef = _bcast(w * scale, d)
    if d.data_ptr() == (workspace.get("A", tuple(d.shape), d).data_ptr() if workspace is not None else -1):
        wd = d.mul_(coef)  # the masked copy lives in the workspace: scale it in place
    else:
        wd = d * coef
    out = _ties_combine(b, wd, w, bool(normalize), float(params.get("lambda", 1.0)), workspace)
    return _finish(out, base, workspace)


def _coef(params: dict[str, Any], w: Tensor, dens: Tensor) -> Tensor | None:
    """The weights with DARE's 1/p rescale folded in (only where something is dropped); ``None`` for
    the L1 rescale, which has no fused kernel."""
    inverse = inverse_rescale(params)
    if inverse is None:
        return None
    return zero_where_dropped(w, dens) if inverse and bool((dens < 1).any()) else w


def _dare_plan(params: dict[str, Any], w: Tensor, dens: Tensor, drawn: bool) -> Plan | None:
    coef = _coef(params, w, dens)
    if coef is None:
        return None
    lam = float(params.get("lambda", 1.0))
    if not drawn:
        return ta_plan(params, w, w * (lam / divisor(params, coef)))
    return Plan("dare", coef * (lam / divisor(params, coef)), w, lam, 1.0, bool(params.get("normalize", False)),
                keep_threshold(dens))  # fmt: skip


def _dare_ties_plan(params: dict[str, Any], w: Tensor, dens: Tensor, drawn: bool) -> Plan | None:
    coef = _coef(params, w, dens)
    if coef is None:
        return None
    return ties_plan(params, w, "dare_ties", coef=coef, below=keep_threshold(dens)) if drawn else ties_plan(params, w)


# mergekit draws DARE's masks with its own RNG: a drop exports equal in distribution only
_MK_INPUTS = {"weight": ("weight", REQUIRED), "density": ("density", 1.0)}

register(
    OperatorSpec(
        "dare",
        dare,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "rescale": "inverse"},
        sparsify="random",
        mergekit_method="dare_linear",
        mergekit_defaults={"normalize": False, "rescale": True, "lambda": 1.0},
        mergekit_inputs=_MK_INPUTS,
        mergekit_rescale=("l1", "none"),
        mergekit_drop="distribution",
        fused=_dare_plan,
        description="random drop and rescale, then task arithmetic",
    ),
    "dare_linear",
)
register(
    OperatorSpec(
        "dare_ties",
        dare_ties,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "rescale": "inverse"},
        sparsify="random",
        mergekit_method="dare_ties",
        mergekit_defaults={"normalize": False, "rescale": True, "lambda": 1.0},
        mergekit_inputs=_MK_INPUTS,
        mergekit_rescale=("l1", "none"),
        mergekit_drop="distribution",
        fused=_dare_ties_plan,
        description="random drop and rescale, then TIES election and merge",
    )
)

