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
from evomerge.zoo import RECIPE, is_complete, zoo_path

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

_DENSITY_METHODS = {"ties", "dare", "dare_ties"}


def read_num_layers(space: SearchSpace) -> int:
    """Block count of the base model, from its config or, for hub models, from the space."""
    if space.genome.num_layers is not None:
        return space.genome.num_layers
    ref = space.model_ref(space.base_model)
    if ref.startswith("zoo://"):
        if not is_complete(zoo_path()):
            return int(RECIPE["model"]["layers"])  # known before the zoo is built (dry runs)
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
    """Per layer group and per source model: a weight, and a density for TIES-like methods."""

    kind = "parameter_space"

    def __init__(self, space: SearchSpace, num_layers: int | None = None):
        self.space = space
        self.method = space.genome.method
        self.num_layers = num_layers if num_layers is not None else read_num_layers(space)
        self.groups = plan_groups(self.num_layers, space.genome.layer_groups)
        self.n_sources = len(space.models)
        self.genes_per_source = 2 if self.method in _DENSITY_METHODS else 1

    @property
    def dim(self) -> int:
        return len(self.groups) * self.n_sources * self.genes_per_source

    def gene_names(self) -> list[str]:
        names = []
        for g in self.groups:
            for s in range(self.n_sources):
                names.append(f"{g.name}/m{s}/weight")
                if self.genes_per_source == 2:
                    names.append(f"{g.name}/m{s}/density")
        return names

    def decode(self, x: list[float]) -> Recipe:
        if len(x) != self.dim:
            raise ValueError(f"genome has {self.dim} genes, got {len(x)}")
        wlo, whi = self.space.genome.weight_bounds
        dlo, dhi = self.space.genome.density_bounds
        it = iter(min(1.0, max(0.0, float(v))) for v in x)
        groups = []
        for g in self.groups:
            weights, densities = [], []
            for _ in range(self.n_sources):
                weights.append(wlo + (whi - wlo) * next(it))
                if self.genes_per_source == 2:
                    densities.append(dlo + (dhi - dlo) * next(it))
            groups.append(
                LayerGroup(
                    name=g.name,
                    kind=g.kind,  # type: ignore[arg-type]
                    start=g.start,
                    stop=g.stop,
                    weights=weights,
                    densities=densities or None,
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

