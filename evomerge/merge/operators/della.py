"""DELLA: magnitude-ranked random drop (MagPrune), then TIES (``della``) or task arithmetic."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from evomerge.merge.operators import REQUIRED, OperatorSpec, register
from evomerge.merge.operators._common import _bcast, _della_sparsify, _finish, _prep, _ta_combine, _ties_combine
from evomerge.merge.operators._fused import Plan, divisor, inverse_rescale, ta_plan, ties_plan

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["della", "della_linear"]


def della(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    noise=None,
    ranks=None,
    workspace=None,
    normalize=True,
    rescale="inverse",
    epsilon=0.15,
    **params,
) -> Tensor:
    """DELLA-merging (Deep et al. 2024): MagPrune drop, rescale, TIES election, disjoint merge
    (mergekit's ``della``).

    MagPrune keeps entry ``i`` with probability ``density - epsilon + 2 epsilon r_i`` where ``r_i`` in
    [0, 1] is the normalised rank of |tau_i| (smallest 0, largest 1). Conventions, and why:

    - ranks are taken within the whole tensor (as TIES trims per tensor); mergekit 0.1.5 ranks within
      each row of a matrix. For the materializer a per-tensor rank is a lookup in a precomputed
      cumulative histogram of |tau| (``ranks`` given), with no per-candidate sort.
    - ``rescale: inverse`` (default) multiplies each kept entry by ``1/p_i``, the paper's rule
      (unbiased per entry, streaming); ``l1`` is mergekit's ``rescale: true`` (match the L1 norm);
      ``none``.
    - probabilities are clamped to [0, 1] rather than rejecting ``density +- epsilon`` outside (0, 1)
      as mergekit does, so every point of a search space is valid.

    The drop draws ``u ~ U[0,1)`` per entry (``noise``, or from ``generator``): keep when ``u < p``.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0] == 0:
        return base.clone()
    d, scale = _della_sparsify(d, dens, float(epsilon), ranks, generator, noise, rescale)
    wd = d * _bcast(w * scale, d)
    out = _ties_combine(b, wd, w, bool(normalize), float(params.get("lambda", 1.0)), None)
    return _finish(out, base, None)


def della_linear(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    noise=None,
    ranks=None,
    workspace=None,
    normalize=False,
    rescale="inverse",
    epsilon=0.15,
    **params,
) -> Tensor:
    """DELLA's MagPrune drop and rescale, then task arithmetic (mergekit's ``della_linear``)."""
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0]:
        d, scale = _della_sparsify(d, dens, float(epsilon), ranks, generator, noise, rescale)
        w = w * scale
    out = _ta_combine(b, d, w, bool(normalize), float(params.get("lambda", 1.0)))
    return _finish(out, base, None)


def _plan(elect: bool) -> Callable[..., Plan | None]:
    def plan(params: dict[str, Any], w: Tensor, dens: Tensor, drawn: bool) -> Plan | None:
        inverse = inverse_rescale(params)
        if inverse is None:
            return None
        lam = float(params.get("lambda", 1.0))
        if not drawn:  # nothing dropped (p = 1 everywhere): TIES or task arithmetic
            return ties_plan(params, w) if elect else ta_plan(params, w, w * (lam / divisor(params, w)))
        return ties_plan(params, w, "della", lam=lam if elect else lam / divisor(params, w), inverse=inverse,
                         elect=elect)  # fmt: skip

    return plan


# mergekit's epsilon is per model (evomerge takes one for all). A drop does not export: mergekit ranks
# |tau| within each row where evomerge ranks within the whole tensor, so even the keep probabilities
# differ (the two agree only at density 1, where nothing is dropped)
_MK_INPUTS = {"weight": ("weight", REQUIRED), "density": ("density", 1.0), "epsilon": ("epsilon", 0.15)}

register(
    OperatorSpec(
        "della",
        della,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": True, "rescale": "inverse", "epsilon": 0.15},
        sparsify="della",
        mergekit_method="della",
        mergekit_defaults={"normalize": True, "rescale": True, "lambda": 1.0},
        mergekit_inputs=_MK_INPUTS,
        mergekit_rescale=("l1", "none"),
        mergekit_drop="none",
        fused=_plan(True),
        description="magnitude-ranked random drop, TIES election and merge",
    )
)
register(
    OperatorSpec(
        "della_linear",
        della_linear,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "rescale": "inverse", "epsilon": 0.15},
        sparsify="della",
        mergekit_method="della_linear",
        mergekit_defaults={"normalize": False, "rescale": True, "lambda": 1.0},
        mergekit_inputs=_MK_INPUTS,
        mergekit_rescale=("l1", "none"),
        mergekit_drop="none",
        fused=_plan(False),
        description="magnitude-ranked random drop, task arithmetic",
    )
)

