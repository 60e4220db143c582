"""Export a data-flow candidate as a Hugging Face folder that loads with ``trust_remote_code``.

::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)

The folder holds ``modeling_evomerge_dataflow.py`` (the architecture: a Llama whose blocks run along a
layer path with per-step input scales; it imports only ``torch`` and ``transformers``), a
``config.json`` whose ``auto_map`` points at it and which carries the path (``dfs_path``,
``dfs_scales``, ``dfs_blocks``, ``dfs_models``), ``model.safetensors`` with the embeddings, final
norm, head and only the blocks the path uses -- each once, however often the path repeats it -- the
embed source's tokenizer and generation config, and ``evomerge_recipe.json``.

``trust_remote_code=True`` is required because this architecture is not in ``transformers``: it makes
``transformers`` import the modeling file from the folder (review it before trusting a folder from
elsewhere). Without it loading stops with an unknown-model-type error instead of building the wrong
model. The exported model's logits equal the in-memory candidate's on the same input (same class,
same tensors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from evomerge.files import staging_dir
from evomerge.genomes.base import ExportCard, card_sections
from evomerge.genomes.data_flow.model import DataFlowMaterializer
from evomerge.genomes.data_flow.recipe import DataFlowRecipe
from evomerge.merge.checkpoint import TOKENIZER_FILES

MODELING_FILE = "modeling_evomerge_dataflow.py"
AUTO_MAP = {
    "AutoConfig": "modeling_evomerge_dataflow.DataFlowConfig",
    "AutoModel": "modeling_evomerge_dataflow.DataFlowModel",
    "AutoModelForCausalLM": "modeling_evomerge_dataflow.DataFlowForCausalLM",
}


def dataflow_model_card(recipe: DataFlowRecipe, card: ExportCard) -> str:
    """README.md for an exported data-flow candidate (the counterpart of the parameter-space ``model_card``)."""
    study, number = card.study, card.number

    def name(i: int) -> str:
        return card.name_of(recipe.models[i])

    steps = [
        f"| {i} | {m} (`{card.name_of(recipe.models[m])}`) | {layer} | {s:.4g} |"
        for i, ((m, layer), s) in enumerate(zip(recipe.path, recipe.scales, strict=True))
    ]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge, data-flow]",
        "---",
        f"# {study} / candidate {number}",
        "",
        f"A data-flow merge found by evomerge in study `{study}`: a path of {len(recipe.path)} steps through "
        f"{len(recipe.unique_blocks())} distinct blocks of {len(recipe.models)} models.",
        "",
        "Load it with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`: the architecture",
        "(`modeling_evomerge_dataflow.py`, in this folder) is not part of transformers; read it before trusting it.",
        "",
        f"- embeddings and tokenizer: model {recipe.embed_source} (`{name(recipe.embed_source)}`)",
        f"- final norm and head: model {recipe.head_source} (`{name(recipe.head_source)}`)",
        f"- recipe hash: `{recipe.hash()}`",
        "",
        *card_sections(card, [(f"model {i}", m) for i, m in enumerate(recipe.models)]),
        "## Path",
        "",
        "| step | model | layer | input scale |",
        "|---|---|---|---|",
        *steps,
        "",
        "The recipe is in `evomerge_recipe.json`; with the source models it rebuilds this model exactly.",
        "",
    ]
    return "\n".join(lines)


def save_dataflow(
    recipe: DataFlowRecipe, materializer, out_dir: str | Path, *, model=None, readme: str | None = None
) -> Path:
    """Write ``recipe``'s candidate into ``out_dir`` (created; written beside and renamed into place).

    ``materializer`` is a :class:`~evomerge.genomes.data_flow.model.DataFlowMaterializer` holding the recipe's
    models; pass ``model`` to reuse a candidate it made (it is re-wired to ``recipe``), and ``readme``
    to write a model card (e.g. :func:`dataflow_model_card`) as ``README.md``.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    if model is None:
        model = materializer.new_model()
    materializer.apply(recipe, model)
    model.config.auto_map = dict(AUTO_MAP)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        # save_pretrained writes auto_map only for registered classes; make sure the folder is complete.
        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["auto_map"] = dict(AUTO_MAP)
        cfg["model_type"] = "evomerge_dataflow"
        cfg["architectures"] = ["DataFlowForCausalLM"]
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        shutil.copy2(Path(__file__).with_name(MODELING_FILE), tmp / MODELING_FILE)
        src = Path(materializer.model_paths[recipe.embed_source])
        for fname in TOKENIZER_FILES:
            f = src / fname
            if f.is_file() and not (tmp / fname).exists():
                shutil.copy2(f, tmp / fname)
        (tmp / "evomerge_recipe.json").write_text(json.dumps(json.loads(recipe.canonical_json()), indent=2) + "\n")
        if readme is not None:
            (tmp / "README.md").write_text(readme)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.config.auto_map = None
    return out


def export(recipe: DataFlowRecipe, out_dir: Path, card: ExportCard) -> Path:
    """The kind's exporter: the candidate's folder with a model card, from the recipe's own models."""
    readme = dataflow_model_card(recipe, card)
    return save_dataflow(recipe, DataFlowMaterializer.from_refs(recipe.models), out_dir, readme=readme)
