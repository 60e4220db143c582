"""What the study loop tells an algorithm about the problem: which objectives are bounded, the genome layout.

The loop knows no algorithm by name: it hands every algorithm a ``SearchContext`` and the algorithm's
``derive_settings`` completes the user's settings from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.objectives import is_bounded
from evomerge.search import REGISTRY, Algorithm, GenomeLayout, SearchContext, make_algorithm

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

def genome_layout(genome: Any) -> GenomeLayout | None:
    """The layout of a parameter-space genome (per group, genes per source); None for other kinds."""
    n, per = getattr(genome, "n_sources", None), getattr(genome, "genes_per_source", None)
    if n is None or per is None:
        return None
    return GenomeLayout(n_sources=int(n), genes_per_source=int(per))


def search_context(space: SearchSpace, genome: Any, cls: type[Algorithm] = Algorithm) -> SearchContext:
    """The context ``cls.derive_settings`` reads (the layout only when ``cls.needs_layout``)."""
    layout = genome_layout(genome) if cls.needs_layout else None
    return SearchContext(bounded=tuple(is_bounded(o) for o in space.objectives), layout=layout)


def algorithm_settings(space: SearchSpace, genome: Any) -> dict[str, Any]:
    """The space's algorithm settings completed by the algorithm from the objectives and the genome."""
    cls = REGISTRY.get(space.algorithm.name)
    settings = dict(space.algorithm.settings)
    if cls is None:
        return settings  # make_algorithm names the unknown algorithm
    return cls.derive_settings(settings, search_context(space, genome, cls))


def build_algorithm(space: SearchSpace, genome: Any) -> Algorithm:
    """The space's algorithm for ``genome`` (raises ValueError/TypeError on a bad name or setting)."""
    return make_algorithm(
        space.algorithm.name,
        dim=genome.dim,
        directions=[o.direction for o in space.objectives],
        seed=space.seed,
        weights=[o.weight for o in space.objectives],
        **algorithm_settings(space, genome),
    )
