"""Export a parameter-space candidate: the merged Hugging Face folder, its mergekit config and a model card."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from evomerge.genomes.base import ExportCard, scores_table
from evomerge.merge import Materializer
from evomerge.merge.mergekit_export import dump_mergekit_yaml, recipe_to_mergekit
from evomerge.recipe import Recipe
from evomerge.zoo import resolve_ref


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


def export(recipe: Recipe, out_dir: Path, card: ExportCard) -> Path:
    """Write the merged model, ``mergekit_config.yml`` (when mergekit can express the recipe),
    ``recipe.json`` and ``README.md`` into ``out_dir`` (absent or empty)."""
    mat = Materializer(resolve_ref(recipe.base), [resolve_ref(s) for s in recipe.sources])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted export never leaves a half model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf_logging.disable_progress_bar()  # one "wrote DIR" line is the command's output
        mat.save_merged(recipe, tmp, write_recipe=False)  # recipe.json below, with the card
        mk = recipe_to_mergekit(resolved_for_mergekit(recipe))
        if mk is not None:
            (tmp / "mergekit_config.yml").write_text(dump_mergekit_yaml(mk))
        (tmp / "recipe.json").write_text(json.dumps(json.loads(recipe.canonical_json()), indent=2))
        readme = model_card(card.study, card.number, recipe, dict(card.scores), card.objectives)
        (tmp / "README.md").write_text(readme)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
