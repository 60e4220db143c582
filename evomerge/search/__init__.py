"""Search algorithms with ask/tell and plain-data state (DESIGN.md section 6).

``make_algorithm(name, dim=..., directions=[...], seed=..., weights=None, **settings)`` builds one;
``REGISTRY`` maps names to classes; ``restore_algorithm(state)`` rebuilds one from its ``state_dict()``.
"""

from evomerge.search.base import (
    REGISTRY,
    Algorithm,
    Proposal,
    make_algorithm,
    normalize_directions,
    private_global_rng,
    register,
    restore_algorithm,
)
from evomerge.search.cmaes import CMAES
from evomerge.search.nsga2 import NSGA2
from evomerge.search.uniform import RandomSearch

__all__ = [
    "REGISTRY",
    "Algorithm",
    "CMAES",
    "NSGA2",
    "Proposal",
    "RandomSearch",
    "make_algorithm",
    "normalize_directions",
    "private_global_rng",
    "register",
    "restore_algorithm",
]
