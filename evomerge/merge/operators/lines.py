"""LiNeS: a base merge whose task vector is scaled linearly with depth."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.merge.operators import OperatorSpec, register
from evomerge.merge.operators._common import _finish, _work_dtype
from evomerge.merge.operators._wrap import WRAP, _base_merge

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["lines", "lines_scale"]


def lines_scale(layer: int | str | None, num_layers: int | None, alpha: float, beta: float) -> float:
    """LiNeS coefficient of a tensor: alpha + beta * l / (L - 1) for block l of L; the embeddings take
    alpha (depth 0) and the tensors after the blocks (final norm, head) alpha + beta (depth 1)."""
    if isinstance(layer, int) and not isinstance(layer, bool):
        if num_layers is None or num_layers <= 1:
            return float(alpha)
        return float(alpha) + float(beta) * layer / (num_layers - 1)
    if layer == "head":
        return float(alpha) + float(beta)
    return float(alpha)


def lines(
    base,
    deltas,
    weights,
    densities=None,
    *,
    layer=None,
    num_layers=None,
    alpha: float = 1.0,
    beta: float = 0.0,
    base_method: str = "task_arithmetic",
    base_params: dict | None = None,
    workspace=None,
    **kw: Any,
) -> Tensor:
    """LiNeS (Wang et al. 2024): scale the merged task vector of block ``l`` by ``alpha + beta l/(L-1)``.

    The merged task vector is that of ``base_method`` (any operator that does not itself wrap one) with
    ``base_params``; shallow blocks keep less of it than deep ones when ``beta > 0``, which protects
    the base model's general features. Needs the block index: the materializer passes ``layer`` (block
    index, ``"embed"`` or ``"head"``) and ``num_layers``. With alpha = 1, beta = 0 (the defaults) the
    result is the base merge exactly.
    """
    merged = _base_merge(base_method, base_params, base, deltas, weights, densities, kw)
    s = lines_scale(layer, num_layers, alpha, beta)
    if s == 1.0:
        return merged
    dt = _work_dtype(base)
    b = base.to(dt)
    return _finish(b + s * (merged.to(dt) - b), base, None)


register(
    OperatorSpec(
        "lines",
        lines,
        ("weight", "density"),
        {"alpha": 1.0, "beta": 0.0, **WRAP},
        group_params=("alpha", "beta"),
        param_bounds={"alpha": (0.0, 2.0), "beta": (-1.0, 1.0)},
        context=frozenset({"layer"}),
        description="base merge with the task vector scaled linearly with depth",
    )
)

