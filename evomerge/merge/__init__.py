"""Parameter-space merging: tensor operators (``operators``) and the in-memory materializer.

>>> from evomerge.merge import Materializer, OPERATORS
>>> mat = Materializer(base_path, [expert_a, expert_b])       # loads once, keeps task vectors resident
>>> model = mat.new_model()                                    # preallocated, eval mode
>>> mat.apply(recipe, model)                                   # in place, no disk write
"""

from evomerge.merge.checkpoint import load_state_dict
from evomerge.merge.draws import tensor_generator, tensor_seed
from evomerge.merge.materialize import Materializer
from evomerge.merge.operators import ALIASES, OPERATORS, OperatorSpec, get_operator, resolve_params

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
