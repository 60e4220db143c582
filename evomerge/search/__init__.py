"""Search algorithms with ask/tell and plain-data state.

``make_algorithm(name, dim=..., directions=[...], seed=..., weights=None, **settings)`` builds one;
``REGISTRY`` maps names to classes; ``restore_algorithm(state)`` rebuilds one from its ``state_dict()``.
Every module of this package is imported here, so an algorithm is one new module whose class is
decorated with ``@register``; ``tests/test_algorithms.py`` runs every registered one.
"""

import importlib
import pkgutil

from evomerge.search.base import (
    REGISTRY,
    Algorithm,
    GenomeLayout,
    Proposal,
    SearchContext,
    make_algorithm,
    normalize_directions,
    private_global_rng,
    register,
    restore_algorithm,
)
from evomerge.search.cmaes import CMAES
from evomerge.search.m2n2 import M2N2
from evomerge.search.map import MAP, nested_map_pairs
from evomerge.search.nsga2 import NSGA2
from evomerge.search.optuna_samplers import OptunaGP, OptunaNSGA2, OptunaTPE
from evomerge.search.uniform import RandomSearch

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "REGISTRY",
    "Algorithm",
    "CMAES",
    "GenomeLayout",
    "MAP",
    "M2N2",
    "NSGA2",
    "OptunaGP",
    "OptunaNSGA2",
    "OptunaTPE",
    "Proposal",
    "RandomSearch",
    "SearchContext",
    "make_algorithm",
    "nested_map_pairs",
    "normalize_directions",
    "private_global_rng",
    "register",
    "restore_algorithm",
]
