"""The data-flow (layer path) genome: DESIGN section 5, "Data-flow space (DFS)".

- :class:`DataFlowGenome` (``genome``): unit-cube genes -> :class:`DataFlowRecipe` (``recipe``);
- :class:`DataFlowGenomeSpec` (``spec``): the space file's ``genome: {type: data_flow, ...}`` block;
- :class:`DataFlowMaterializer` (``model``): source blocks resident, candidates re-wired in place, a
  ``transformers`` model lm-eval's HFLM runs; cost measures :func:`path_length`, :func:`path_params`;
- :func:`save_dataflow` (``export``): a folder loading with ``trust_remote_code=True``;
- :func:`resolve_source` (``sources``): PS results (exported folders, PS recipe JSON) as sources.

Heavy imports (torch, transformers) happen in ``model`` / ``export`` only, so the genome, the recipe
and the spec import cheaply on the driver.
"""

from evomerge.dfs.genome import DataFlowGenome, read_block_count
from evomerge.dfs.recipe import DataFlowRecipe, recipe_from_json
from evomerge.dfs.sources import resolve_source
from evomerge.dfs.spec import DataFlowGenomeSpec

__all__ = [
    "DataFlowGenome",
    "DataFlowGenomeSpec",
    "DataFlowMaterializer",
    "DataFlowRecipe",
    "cost_measure",
    "path_length",
    "path_params",
    "read_block_count",
    "recipe_from_json",
    "resolve_source",
    "save_dataflow",
]


def __getattr__(name: str):
    if name in ("DataFlowMaterializer", "cost_measure", "path_length", "path_params", "COST_MEASURES"):
        from evomerge.dfs import model

        return getattr(model, name)
    if name == "save_dataflow":
        from evomerge.dfs.export import save_dataflow

        return save_dataflow
    raise AttributeError(name)
