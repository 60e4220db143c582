"""Passthrough: one model's tensors as they are (a layer group may pick another source)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.merge._torch import torch
from evomerge.merge.operators import OperatorSpec, register
from evomerge.merge.operators._common import _stack, _work_dtype

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["passthrough"]


def passthrough(
    base,
    deltas,
    weights=None,
    densities=None,
    *,
    source: int = 0,
    scale: float = 1.0,
    source_tensor: Tensor | None = None,
    workspace=None,
    **_: Any,
) -> Tensor:
    """One model's tensor as it is (times ``scale``): ``source`` indexes the sources, ``-1`` the base.

    A layer group may override ``source`` (and ``scale``), so a recipe can take each block from a
    different model (a frankenmerge at the base's depth; to stack layers into a deeper model use
    :meth:`Materializer.stacked_state_dict`). The materializer passes ``source_tensor``, the tensor
    read from the source's checkpoint, so a passthrough of a whole model is bit-exact; without it the
    result is ``theta0 + tau_source`` (float round-off of the task vector).
    """
    src = int(source)
    if source_tensor is not None:
        out = source_tensor.to(base.device)
    elif src < 0:
        out = base
    else:
        d = _stack(deltas, base, _work_dtype(base))
        if not 0 <= src < d.shape[0]:
            raise ValueError(f"passthrough source {src} out of range for {d.shape[0]} sources")
        out = base.to(d.dtype) + d[src]
    if float(scale) != 1.0:
        out = out.to(_work_dtype(base)) * float(scale)
    return torch.empty_like(base).copy_(out)


register(
    OperatorSpec(
        "passthrough",
        passthrough,
        (),
        {"source": 0, "scale": 1.0},
        group_params=("source", "scale"),
        param_bounds={"source": lambda n: (0, n - 1)},
        context=frozenset({"source_tensor"}),
        mergekit_method="passthrough",
        mergekit_defaults={},
        # one model per layer slice; its scale is kept as the slice's weight (see merge/build.py)
        mergekit_inputs={"scale": ("weight", 1.0)},
        mergekit_models=1,
        description="one model's tensors as they are",
    )
)

