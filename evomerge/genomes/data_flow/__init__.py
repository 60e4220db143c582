"""The data-flow (layer path) genome: the models' own blocks run along a searched path with input scales.

- :class:`DataFlowGenomeSpec` (``spec``): the space file's ``genome: {type: data_flow, ...}`` block;
- :class:`DataFlowGenome` (``genome``): unit-cube genes -> :class:`DataFlowRecipe` (``recipe``);
- ``model``: :class:`~evomerge.genomes.data_flow.model.DataFlowMaterializer`, source blocks resident and
  candidates re-wired in place into a ``transformers`` model lm-eval's HFLM runs;
- ``export``: :func:`~evomerge.genomes.data_flow.export.save_dataflow`, a folder loading with
  ``trust_remote_code=True`` (the architecture is ``modeling_evomerge_dataflow.py``, shipped in it);
- ``sources``: parameter-space results (exported folders, recipe JSON) as sources;
- ``costs``: the cost measures ``path_length``, ``path_params`` (and ``params``).

torch and transformers are imported by ``model`` and ``export`` only, so the spec, the genome and the
recipe import cheaply on the driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.genomes.base import ExportCard, FieldError, GenomeKind, Materializing, WorkerSettings, nonzero_params
from evomerge.genomes.checks import arch_config, check_same_architecture, open_model
from evomerge.genomes.data_flow.costs import path_length, path_params
from evomerge.genomes.data_flow.genome import DataFlowGenome, read_block_count
from evomerge.genomes.data_flow.recipe import DataFlowRecipe
from evomerge.genomes.data_flow.sources import is_ps_recipe_file, study_recipe
from evomerge.genomes.data_flow.spec import ARCH_KEYS, SUPPORTED_MODEL_TYPES, DataFlowGenomeSpec
from evomerge.study_refs import StudyRefError, is_study_ref

if TYPE_CHECKING:
    from evomerge.space import SearchSpace


def _make_genome(space: SearchSpace) -> DataFlowGenome:
    return DataFlowGenome.from_spec(space.genome, [space.model_ref(m) for m in space.models])


def _built_at_run_time(ref: str) -> bool:
    return is_ps_recipe_file(ref) or is_study_ref(ref)


def _check_space(space: SearchSpace) -> None:
    space.genome.check_models(len(space.models))
    if space.source_dir is None:  # not loaded from a file: relative references mean nothing yet
        return
    # a PS recipe JSON is built into a folder at run time, from sources the recipe names
    # ...and so is a stored PS candidate (study://), whose recipe must be a parameter-space one
    models = [open_model(space, f"models.{i}", m, _built_at_run_time) for i, m in enumerate(space.models)]
    for i, m in enumerate(space.models):
        if is_study_ref(m):
            try:
                study_recipe(space.model_ref(m))
            except StudyRefError as e:
                raise FieldError(f"models.{i}", str(e)) from None
    for m in models:
        if m.adapter is not None:
            raise FieldError(m.field, f"{m.ref!r} is a LoRA adapter; a layer path needs whole models")
        kind = arch_config(m.config or {}).get("model_type")
        if kind is not None and kind not in SUPPORTED_MODEL_TYPES:
            raise FieldError(m.field, f"{m.ref!r} is a {kind!r} model; data-flow paths support "
                                      f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    local = [m for m in models if m.config is not None]
    if local:  # every block of a path must run on the hidden states any other block produces
        check_same_architecture(local[0], local[1:], ARCH_KEYS, shapes=False)


def _materializer(cfg: WorkerSettings, device: str, dtype: Any) -> Materializing:
    from evomerge.genomes.data_flow.model import DataFlowMaterializer  # torch, transformers: workers only

    embed = cfg.genome.get("embed_source", 0)
    mat = DataFlowMaterializer.from_refs(cfg.sources, device=device, dtype=dtype, embed_source=embed)
    return Materializing(mat, mat.tokenizer_path(), "eager", "data-flow genomes have no fused kernels")


def _export(recipe: DataFlowRecipe, out_dir: Path, card: ExportCard) -> Path:
    from evomerge.genomes.data_flow.export import export  # torch, transformers: export only

    return export(recipe, out_dir, card)


def _describe(genome: DataFlowGenome) -> str:
    slots = sum(genome.num_layers) * genome.repeats
    return (f"data_flow, {slots} layer slots ({genome.repeats} x {sum(genome.num_layers)} blocks) + "
            f"{genome.n_scale_genes} scale genes ({genome.scale_mode}) = {genome.dim} genes")


def _summary(r: DataFlowRecipe) -> str:
    steps = " ".join(f"m{m}.{layer}" for m, layer in r.path)
    return f"path ({r.path_length}): {steps}"


def _legend(r: DataFlowRecipe) -> str:
    return "recipe: the layer path (its length, then each step: m<source>.<block>); scales in --json"


KIND = GenomeKind(
    name="data_flow",
    spec=DataFlowGenomeSpec,
    recipe=DataFlowRecipe,
    make_genome=_make_genome,
    check_space=_check_space,
    materializer=_materializer,
    export=_export,
    cost_measures={"path_length": path_length, "path_params": path_params, "params": nonzero_params},
    describe=_describe,
    summary=_summary,
    legend=_legend,
)

__all__ = ["KIND", "DataFlowGenome", "DataFlowGenomeSpec", "DataFlowRecipe", "read_block_count"]
