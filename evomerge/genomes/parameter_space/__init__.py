"""The parameter-space genome (Akiba et al. 2024): per layer group and source, a weight and a density.

- :class:`Genome` (``spec``): the space's ``genome:`` block (``type: parameter_space``, the default);
- :class:`ParameterSpaceGenome` (``genome``): unit-cube genes -> :class:`evomerge.recipe.Recipe`;
- ``materializer``: the worker's :class:`evomerge.merge.Materializer` (fused, C or eager kernels);
- ``export``: the merged folder, its mergekit config and a model card.

The recipe class is :class:`evomerge.recipe.Recipe`, below the merge engine that reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.genomes.base import ExportCard, GenomeKind, Materializing, WorkerSettings, nonzero_params
from evomerge.genomes.checks import PS_ARCH_KEYS, check_same_architecture, open_model
from evomerge.genomes.parameter_space.genome import ParameterSpaceGenome, plan_groups, read_num_layers
from evomerge.genomes.parameter_space.spec import Genome
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.space import SearchSpace


def _check_space(space: SearchSpace) -> None:
    if space.base_model is None:
        raise ValueError("a parameter-space genome needs base_model")
    space.genome.check_models(len(space.models))
    if space.source_dir is None:  # not loaded from a file: relative references mean nothing yet
        return
    base = open_model(space, "base_model", space.base_model)
    sources = [open_model(space, f"models.{i}", m) for i, m in enumerate(space.models)]
    check_same_architecture(base, sources, PS_ARCH_KEYS)


def _materializer(cfg: WorkerSettings, device: str, dtype: Any) -> Materializing:
    from evomerge.genomes.parameter_space.materializer import materializer  # torch: workers only

    return materializer(cfg, device, dtype)


def _export(recipe: Recipe, out_dir: Path, card: ExportCard) -> Path:
    from evomerge.genomes.parameter_space.export import export  # torch, transformers: export only

    return export(recipe, out_dir, card)


def _describe(genome: ParameterSpaceGenome) -> str:
    per_group = f"{genome.n_sources} models x {genome.genes_per_source} genes"
    if genome.group_genes:
        per_group = f"({per_group} + {len(genome.group_genes)} group params)"
    return f"{genome.method}, {len(genome.groups)} layer groups x {per_group} = {genome.dim} genes"


def _group_label(name: str) -> str:
    # "layers.0-1" -> "L0-1": the front table's recipe cell has a few dozen columns for every group
    return "L" + name.removeprefix("layers.") if name.startswith("layers.") else name


def _summary(r: Recipe) -> str:
    return " ".join(f"{_group_label(g.name)} " + "/".join(f"{w:.2f}" for w in g.weights) for g in r.groups)


def _legend(r: Recipe) -> str:
    n = len(r.sources)
    per = "/".join(f"w{i}" for i in range(n))
    dens = ", densities in --json" if any(g.densities for g in r.groups) else ""
    return f"recipe: {r.method} weights per layer group (embed, Ln: block n, head), one per source: {per}{dens}"


KIND = GenomeKind(
    name="parameter_space",
    spec=Genome,
    recipe=Recipe,
    make_genome=ParameterSpaceGenome,
    check_space=_check_space,
    materializer=_materializer,
    export=_export,
    cost_measures={"params": nonzero_params},
    describe=_describe,
    summary=_summary,
    legend=_legend,
)

__all__ = ["KIND", "Genome", "ParameterSpaceGenome", "plan_groups", "read_num_layers"]
