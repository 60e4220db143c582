"""Model references a data-flow search accepts as sources (PS + DFS).

A DFS source is any reference :func:`evomerge.zoo.resolve_ref` opens (``zoo://NAME``, a local
Hugging Face folder, a hub id), and two forms of a parameter-space (PS) result:

- the folder written by ``evomerge export`` (or :meth:`Materializer.save_merged`): a plain Llama-style
  Hugging Face folder, used as it is;
- a PS recipe JSON file (``recipe.json`` of an export, or one dumped from the store): it is
  materialized once into ``$EVOMERGE_CACHE_DIR/ps_sources/<recipe hash>`` (default
  ``~/.cache/evomerge/ps_sources``), atomically and under a file lock, and that folder is used.

So PS + DFS is: run PS, ``evomerge export`` its best candidate (or take its recipe JSON), and put
that path in the DFS space's ``models`` next to another model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from evomerge.cache import cache_root, file_lock
from evomerge.recipe import Recipe
from evomerge.zoo import resolve_ref


def cache_dir() -> Path:
    return cache_root() / "ps_sources"


def is_ps_recipe_file(ref: str) -> bool:
    p = Path(ref)
    if not (p.suffix == ".json" and p.is_file()):
        return False
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("kind", "parameter_space") == "parameter_space"
        and "method" in data
        and "sources" in data
    )


def resolve_source(ref: str) -> str:
    """A DFS model reference as a local folder (or hub id), materializing a PS recipe JSON first."""
    if is_ps_recipe_file(ref):
        return str(materialize_ps_recipe(Path(ref)))
    return resolve_ref(ref)



def materialize_ps_recipe(recipe_file: Path, root: Path | None = None) -> Path:
    """Write the PS recipe's merged model once (cached by recipe hash) and return its folder."""
    from evomerge.merge import Materializer  # torch: only when a PS recipe must be built

    recipe = Recipe.from_json(Path(recipe_file).read_text())
    root = Path(root) if root is not None else cache_dir()
    final = root / recipe.hash()
    if (final / "config.json").is_file():
        return final
    with file_lock(root / f".{recipe.hash()}.lock"):
        if (final / "config.json").is_file():
            return final
        tmp = root / f".{recipe.hash()}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            mat = Materializer(resolve_ref(recipe.base), [resolve_ref(s) for s in recipe.sources])
            mat.save_merged(recipe, tmp)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
