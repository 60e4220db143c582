"""Genotype <-> recipe for the parameter-space genome (Akiba et al. 2024).

Algorithms work in the unit cube; this module maps a point of [0,1]^dim onto per-group, per-source
weights and densities inside the space's bounds, and names every gene so a user can read a genome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.genomes.base import SpaceError
from evomerge.recipe import LayerGroup, Recipe
from evomerge.zoo import RECIPES, parse_zoo_uri, zoo_uri_built

if TYPE_CHECKING:
    from evomerge.space import SearchSpace


def read_num_layers(space: SearchSpace) -> int:
    """Block count of the base model, from its config or, for hub models, from the space."""
    if space.genome.num_layers is not None:
        return space.genome.num_layers
    ref = space.model_ref(space.base_model)
    if ref.startswith("zoo://"):
        if not zoo_uri_built(ref):
            return int(RECIPES[parse_zoo_uri(ref)[0]]["model"]["layers"])  # known before the zoo is built (dry runs)
    cfg = Path(space.resolve_path(space.base_model)) / "config.json"
    if not cfg.is_file():
        raise SpaceError(
            f"field 'genome.num_layers': base model {space.base_model!r} is not a local folder, "
            "so give its block count"
        )
    data = json.loads(cfg.read_text())
    n = data.get("num_hidden_layers") or data.get("n_layer") or data.get("num_layers")
    if not n:
        raise SpaceError(f"{cfg}: no num_hidden_layers in the base model's config")
    return int(n)


@dataclass(frozen=True)
class GroupPlan:
    name: str
    kind: str
    start: int | None = None
    stop: int | None = None


def plan_groups(num_layers: int, layer_groups: int | str) -> list[GroupPlan]:
    """Embeddings, then contiguous block runs as even as possible, then the head; or one for all."""
    if layer_groups == "model":
        return [GroupPlan("all", "all")]
    n = num_layers if layer_groups == "block" else min(int(layer_groups), num_layers)
    plans = [GroupPlan("embed", "embed")]
    for g in range(n):
        start, stop = g * num_layers // n, (g + 1) * num_layers // n
        name = f"layers.{start}" if stop - start == 1 else f"layers.{start}-{stop - 1}"
        plans.append(GroupPlan(name, "blocks", start, stop))
    plans.append(GroupPlan("head", "head"))
    return plans


class ParameterSpaceGenome:
    """Per layer group: the operator's per-source genes (a weight, a density for TIES-like methods),
    then one gene per searchable group param (SLERP's ``t``, consensus ``k``...), as its spec declares.

    A group param fixed in the space's ``genome.params`` is not searched.
    """

    kind = "parameter_space"

    def __init__(self, space: SearchSpace, num_layers: int | None = None):
        self.space = space
        # the operator registry imports torch; a genome kind's module stays light for the CLI's validation
        from evomerge.merge.operators import get_operator

        self.method = space.genome.method
        self.spec = get_operator(self.method)
        self.num_layers = num_layers if num_layers is not None else read_num_layers(space)
        self.groups = plan_groups(self.num_layers, space.genome.layer_groups)
        self.n_sources = len(space.models)
        self.source_genes = self.spec.source_genes
        self.genes_per_source = len(self.source_genes)
        fixed = space.genome.params
        self.group_genes = tuple(p for p in self.spec.param_bounds if p not in fixed)
        self._bounds = {"weight": space.genome.weight_bounds, "density": space.genome.density_bounds}

    @property
    def genes_per_group(self) -> int:
        return self.n_sources * self.genes_per_source + len(self.group_genes)

    @property
    def dim(self) -> int:
        return len(self.groups) * self.genes_per_group

    def gene_names(self) -> list[str]:
        names = []
        for g in self.groups:
            names += [f"{g.name}/m{s}/{gene}" for s in range(self.n_sources) for gene in self.source_genes]
            names += [f"{g.name}/{p}" for p in self.group_genes]
        return names

    def decode(self, x: list[float]) -> Recipe:
        if len(x) != self.dim:
            raise ValueError(f"genome has {self.dim} genes, got {len(x)}")
        it = iter(min(1.0, max(0.0, float(v))) for v in x)
        groups = []
        for g in self.groups:
            per_source: dict[str, list[float]] = {gene: [] for gene in self.source_genes}
            for _ in range(self.n_sources):
                for gene in self.source_genes:
                    lo, hi = self._bounds[gene]
                    per_source[gene].append(lo + (hi - lo) * next(it))
            params = {p: self.spec.decode_param(p, next(it), self.n_sources) for p in self.group_genes}
            groups.append(
                LayerGroup(
                    name=g.name,
                    kind=g.kind,  # type: ignore[arg-type]
                    start=g.start,
                    stop=g.stop,
                    # operators without a weight gene (SLERP, Model Stock...) read none
                    weights=per_source.get("weight", [1.0] * self.n_sources),
                    densities=per_source.get("density"),
                    params=params or None,
                )
            )
        return Recipe(
            base=self.space.model_ref(self.space.base_model),
            sources=[self.space.model_ref(m) for m in self.space.models],
            method=self.method,
            params=dict(self.space.genome.params),
            groups=groups,
            seed=self.space.seed,
        )
