"""Export a stored candidate as a Hugging Face model folder with a model card naming its recipe."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from evomerge.dfs.recipe import recipe_from_json
from evomerge.merge.mergekit_export import dump_mergekit_yaml, recipe_to_mergekit
from evomerge.recipe import Recipe
from evomerge.space import resolve_ref


class ExportError(ValueError):
    pass


def scores_table(scores: dict[str, float], objectives: list[dict]) -> list[str]:
    """The model card's section of the scores the search recorded, one row per objective."""
    return [
        "## Scores recorded by the search",
        "",
        "| objective | direction | value |",
        "|---|---|---|",
        *(f"| {o['name']} | {o.get('direction', 'maximize')} | {scores.get(o['name'], float('nan')):.6g} |"
          for o in objectives),
        "",
    ]


def model_card(study: str, number: int, recipe: Recipe, scores: dict[str, float], objectives: list[dict]) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        "---",
        f"# {study} / candidate {number}",
        "",
        f"A `{recipe.method}` merge found by evomerge in study `{study}`.",
        "",
        f"- base model: `{recipe.base}`",
        *(f"- source {i}: `{s}`" for i, s in enumerate(recipe.sources)),
        f"- recipe hash: `{recipe.hash()}`",
        "",
        *scores_table(scores, objectives),
        "## Recipe",
        "",
        "The recipe (also in `recipe.json`) with the source models rebuilds this model exactly.",
        "",
        "```json",
        json.dumps(json.loads(recipe.canonical_json()), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def resolved_for_mergekit(recipe: Recipe) -> Recipe:
    """mergekit reads folders, not zoo:// references: point the config at the resolved sources."""
    return recipe.model_copy(
        update={"base": resolve_ref(recipe.base), "sources": [resolve_ref(s) for s in recipe.sources]}
    )


def export_candidate(store, study: str, number: int, out_dir: Path) -> Path:
    from evomerge.merge import Materializer

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty")
    st = store.get_study(study)
    cand = store.get_candidate(study, number)
    if cand is None:
        raise ExportError(f"study {study!r} has no candidate {number}")
    if cand.state != "complete":
        raise ExportError(f"candidate {number} of {study!r} is {cand.state}, not complete")
    recipe = recipe_from_json(cand.recipe_json)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if recipe.kind == "data_flow":
        from evomerge.dfs import DataFlowMaterializer
        from evomerge.dfs.export import dataflow_model_card, save_dataflow

        if out_dir.exists():
            out_dir.rmdir()
        card = dataflow_model_card(study, number, recipe, cand.scores, st.objectives)
        save_dataflow(recipe, DataFlowMaterializer.from_refs(recipe.models), out_dir, readme=card)
        return out_dir
    mat = Materializer(resolve_ref(recipe.base), [resolve_ref(s) for s in recipe.sources])
    # Write beside the target and rename, so an interrupted export never leaves a half model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "wrote DIR" line is the command's output
        mat.save_merged(recipe, tmp, write_recipe=False)  # recipe.json below, with the card
        mk = recipe_to_mergekit(resolved_for_mergekit(recipe))
        if mk is not None:
            (tmp / "mergekit_config.yml").write_text(dump_mergekit_yaml(mk))
        (tmp / "recipe.json").write_text(json.dumps(json.loads(recipe.canonical_json()), indent=2))
        (tmp / "README.md").write_text(model_card(study, number, recipe, cand.scores, st.objectives))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
