"""Weighted average (``linear``, mergekit's model soup) and task arithmetic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.merge.operators import REQUIRED, OperatorSpec, register
from evomerge.merge.operators._common import Workspace, _finish, _prep, _ta_combine
from evomerge.merge.operators._fused import Plan, divisor, ta_plan

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["linear", "task_arithmetic"]


def linear(
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
    **_: Any,
) -> Tensor:
    """Weighted average of the *source models* (model soup): ``sum_t w_t theta_t / sum_t w_t``.

    The base is not one of the averaged models; it only serves as the origin of the task vectors, since
    ``sum_t w_t theta_t / sum_t w_t = theta0 + sum_t w_t tau_t / sum_t w_t`` (so a merge of identical
    models returns that model exactly up to float rounding). With ``normalize: false`` the result is
    ``sum_t w_t theta_t``, as in mergekit. mergekit divides by a zero weight sum (NaN); evomerge treats a
    weight sum with ``|sum| < 1e-8`` as 1 so a search never sees NaN weights. Matches mergekit's
    ``linear`` (every model listed with a weight, no base in the list) to float32 round-off.
    """
    b, d, w, _ = _prep(base, deltas, weights, densities)
    s = float(w.sum())
    if normalize:
        out = _ta_combine(b, d, w, True, 1.0, workspace)
    else:  # sum_t w_t theta_t = (sum_t w_t) theta0 + sum_t w_t tau_t
        out = _ta_combine(b * s, d, w, False, 1.0, workspace)
    return _finish(out, base, workspace)


def task_arithmetic(
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
    **params: Any,
) -> Tensor:
    """``theta0 + lambda * sum_t w_t tau_t`` (divided by ``sum_t w_t`` when ``normalize``).

    Densities are ignored. Matches mergekit's ``task_arithmetic`` (default ``normalize: false``).
    """
    b, d, w, _ = _prep(base, deltas, weights, densities)
    out = _ta_combine(b, d, w, bool(normalize), float(params.get("lambda", 1.0)), workspace)
    return _finish(out, base, workspace)


def _linear_plan(params: dict[str, Any], w: Tensor, dens: Tensor, drawn: bool) -> Plan:
    if params.get("normalize", False):
        return ta_plan(params, w, w / divisor(params, w))
    return ta_plan(params, w, w, float(w.sum()))


def _ta_plan(params: dict[str, Any], w: Tensor, dens: Tensor, drawn: bool) -> Plan:
    return ta_plan(params, w, w * (float(params.get("lambda", 1.0)) / divisor(params, w)))


register(
    OperatorSpec(
        "linear",
        linear,
        ("weight",),
        {"normalize": True},
        needs_base=False,
        mergekit_method="linear",
        mergekit_defaults={"normalize": True},
        mergekit_inputs={"weight": ("weight", REQUIRED)},
        fused=_linear_plan,
        description="weighted average of the source models",
    ),
    "model_soup",
)
register(
    OperatorSpec(
        "task_arithmetic",
        task_arithmetic,
        ("weight",),
        {"lambda": 1.0, "normalize": False},
        mergekit_method="task_arithmetic",
        mergekit_defaults={"normalize": False, "rescale": False, "lambda": 1.0},
        mergekit_inputs={"weight": ("weight", REQUIRED)},
        fused=_ta_plan,
        description="theta0 + lambda sum w_t tau_t",
    )
)

