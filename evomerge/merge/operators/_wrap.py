"""What the operators that wrap a base merge (LiNeS, Consensus) share: the base merge itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.merge.operators import get_operator, resolve_params

if TYPE_CHECKING:
    from torch import Tensor


#: the params of a wrapper: which operator makes the merged task vector, with which params.
WRAP: dict[str, Any] = {"base_method": "task_arithmetic", "base_params": {}}


def _base_merge(base_method: str, base_params, base, deltas, weights, densities, kw) -> Tensor:
    spec = get_operator(base_method)
    if "base_method" in spec.params:
        raise ValueError(f"base_method {base_method!r} cannot itself wrap a base merge")
    passed = {
        key: kw[key] for key in ("generator", "thresholds", "noise", "ranks", "fisher") if kw.get(key) is not None
    }
    return spec.fn(base, deltas, weights, densities, **passed, **resolve_params(spec, base_params))
