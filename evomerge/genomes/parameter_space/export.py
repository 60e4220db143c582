"""Export a parameter-space candidate: the merged Hugging Face folder, its mergekit config and a model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from evomerge.files import staging_dir
from evomerge.genomes.base import ExportCard, card_sections
from evomerge.merge.build import merge_to_folder
from evomerge.merge.mergekit_export import dump_mergekit_yaml, recipe_to_mergekit
from evomerge.recipe import Recipe
from evomerge.zoo import ZOO_PREFIX, build_command, parse_zoo_uri, resolve_ref


def model_card(recipe: Recipe, card: ExportCard, mergekit_note: str) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        "---",
        f"# {card.study} / candidate {card.number}",
        "",
        f"A `{recipe.method}` merge of {len(recipe.sources)} models into `{card.name_of(recipe.base)}`, found by "
        f"evomerge's search in study `{card.study}`.",
        "",
        f"- recipe hash: `{recipe.hash()}`",
        f"- mergekit: {mergekit_note}",
        "",
        *card_sections(card, [("base", recipe.base), *((f"source {i}", s) for i, s in enumerate(recipe.sources))]),
        "## Recipe",
        "",
        "The recipe (also in `recipe.json`) with the source models rebuilds this model exactly "
        "(`evomerge merge recipe.json --out DIR`).",
        "",
        "```json",
        json.dumps(json.loads(recipe.canonical_json()), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def portable_names(recipe: Recipe, card: ExportCard) -> tuple[dict[str, str], str | None]:
    """How ``mergekit_config.yml`` names each source (resolved local path -> name) and the folder those
    names are relative to (None: only hub ids). zoo models: their names in the demo zoo's folder; other
    local folders: relative to the space file's folder, as the space names them; hub ids unchanged."""
    refs = [recipe.base, *recipe.sources]
    zoo = [r for r in refs if r.startswith(ZOO_PREFIX)]
    space_file = card.found.get("file")
    if zoo:
        root = Path(resolve_ref(zoo[0])).parent
    elif space_file:
        root = Path(space_file).parent
    else:
        root = None
    names: dict[str, str] = {}
    for r in refs:
        local = resolve_ref(r)
        if not Path(local).is_absolute():
            continue  # a hub id: mergekit fetches it by name
        names[local] = os.path.relpath(local, root) if root is not None else local
    return names, (str(root) if root is not None and names else None)


def _renamed(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _renamed(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed(v, names) for v in node]
    return names.get(node, node) if isinstance(node, str) else node


def mergekit_text(recipe: Recipe, card: ExportCard) -> str | None:
    """``mergekit_config.yml`` naming the sources portably (see :func:`portable_names`), or None."""
    resolved = recipe.model_copy(
        update={"base": resolve_ref(recipe.base), "sources": [resolve_ref(s) for s in recipe.sources]}
    )
    mk = recipe_to_mergekit(resolved)  # reads the base's tensor names: it needs the real folder
    if mk is None:
        return None
    names, root = portable_names(recipe, card)
    head = [f"# candidate {card.number} of evomerge study {card.study}, as a mergekit config."]
    if root is not None:
        zoo = [r for r in [recipe.base, *recipe.sources] if r.startswith(ZOO_PREFIX)]
        what = (f"the demo zoo's folder (`{build_command(parse_zoo_uri(zoo[0])[0])}` prints it)" if zoo
                else "the space file's folder")
        head += [f"# Model paths are relative to {what}: {root}",
                 f"# so run it from there:  cd {root} && mergekit-yaml /path/to/mergekit_config.yml OUT"]
    return "\n".join(head) + "\n" + dump_mergekit_yaml(_renamed(mk, names))


def export(recipe: Recipe, out_dir: Path, card: ExportCard) -> Path:
    """Write the merged model, ``mergekit_config.yml`` (when mergekit can express the recipe),
    ``recipe.json`` and ``README.md`` into ``out_dir`` (absent or empty).

    The model is built tensor by tensor and written as safetensors with the base's config and
    tokenizer (the engine of `evomerge merge`), so an export costs reading the sources and writing
    the model, not building a transformers model (whose import alone takes seconds)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted export never leaves a half model.
    tmp = staging_dir(out_dir)
    try:
        model = merge_to_folder(recipe, tmp / "model")
        (model / "evomerge_recipe.json").unlink()  # recipe.json below, beside the card that names it
        mk = mergekit_text(recipe, card)
        if mk is not None:
            (model / "mergekit_config.yml").write_text(mk)
            note = "`mergekit_config.yml` gives the same merge (paths relative to the folder its first lines name)"
        else:
            note = "not expressible as a mergekit config (the recipe uses what mergekit lacks)"
        (model / "recipe.json").write_text(json.dumps(json.loads(recipe.canonical_json()), indent=2))
        (model / "README.md").write_text(model_card(recipe, card, note))
        if out_dir.exists():
            out_dir.rmdir()
        model.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
