"""Parameter-space merging: tensor operators (``operators``) and the in-memory materializer.

>>> from evomerge.merge import Materializer, OPERATORS
>>> mat = Materializer(base_path, [expert_a, expert_b])       # loads once, keeps task vectors resident
>>> model = mat.new_model()                                    # preallocated, eval mode
>>> mat.apply(recipe, model)                                   # in place, no disk write
"""

import importlib

from evomerge.merge.operators import ALIASES, OPERATORS, OperatorSpec, get_operator, resolve_params

# The engine loads torch; the operator specs do not. A command that only reads specs (validating a
# space) imports this package without paying for torch, and the engine's names load on first use.
_LAZY = {
    "Materializer": "evomerge.merge.materialize",
    "load_state_dict": "evomerge.merge.checkpoint",
    "tensor_generator": "evomerge.merge.draws",
    "tensor_seed": "evomerge.merge.draws",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALIASES",
    "Materializer",
    "OPERATORS",
    "OperatorSpec",
    "get_operator",
    "load_state_dict",
    "resolve_params",
    "tensor_generator",
    "tensor_seed",
]
