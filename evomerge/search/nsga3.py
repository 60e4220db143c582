"""NSGA-III (pymoo) through its ask/tell interface, multi-objective with reference directions.

pymoo's ``NSGA3`` (Deb and Jain 2014): NSGA-II's non-dominated sorting, but the last front admitted is
thinned by niching around a set of *reference directions* on the unit simplex instead of by crowding
distance, which keeps the population spread when there are three or more objectives (crowding stops
telling points apart there). The directions are Das-Dennis points (``get_reference_directions
("das-dennis", n_obj, n_partitions=...)``); ``n_partitions`` defaults to 12 for two objectives, 6 for
three, 4 for four and 3 above, so their number stays near the population size. ``pop_size`` (default:
the number of directions rounded up to a multiple of 4, as Deb and Jain size it) is the population.

Everything else is :class:`~evomerge.search.nsga2.NSGA2`'s: the unit cube, SBX and polynomial mutation,
failures told as infeasible with the worst values seen plus a margin, parents' keys tracked through
crossover, and the state kept by replay (the reference directions are recomputed from the settings, so
they are not stored).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.search.base import register
from evomerge.search.nsga2 import NSGA2

_DEFAULT_PARTITIONS = {1: 1, 2: 12, 3: 6, 4: 4}


def reference_directions(n_obj: int, n_partitions: int | None = None) -> np.ndarray:
    """Das-Dennis reference directions (rows on the unit simplex) for ``n_obj`` objectives."""
    # pymoo only for nsga3 studies: the algorithm registry stays light
    from pymoo.util.ref_dirs import get_reference_directions

    p = _DEFAULT_PARTITIONS.get(n_obj, 3) if n_partitions is None else int(n_partitions)
    if p < 1:
        raise ValueError(f"nsga3: n_partitions must be >= 1, got {n_partitions}")
    return np.asarray(get_reference_directions("das-dennis", n_obj, n_partitions=p), dtype=float)


@register
class NSGA3(NSGA2):
    name = "nsga3"
    generational = True
    default_settings = {
        "pop_size": None,  # None: the number of reference directions, rounded up to a multiple of 4
        "n_partitions": None,  # Das-Dennis partitions; None: 12 (2 objectives), 6 (3), 4 (4), 3 (more)
        "n_offsprings": None,  # None: pop_size
        "max_generations": None,
    }

    def _pymoo_algorithm(self) -> Any:
        from pymoo.algorithms.moo.nsga3 import NSGA3 as _NSGA3  # pymoo only for nsga3 studies

        dirs = reference_directions(self.n_obj, self.settings["n_partitions"])
        pop_size = self.settings["pop_size"]
        pop_size = int(4 * -(-len(dirs) // 4)) if pop_size is None else int(pop_size)
        if pop_size < 2:
            raise ValueError("nsga3: pop_size must be >= 2")
        n_off = self.settings["n_offsprings"]
        return _NSGA3(ref_dirs=dirs, pop_size=pop_size, n_offsprings=None if n_off is None else int(n_off))

    @property
    def pop_size(self) -> int:
        return int(self._algo.pop_size)
