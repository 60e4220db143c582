"""Model references a data-flow search accepts as sources (PS + DFS).

A DFS source is any reference :func:`evomerge.zoo.resolve_ref` opens (``zoo://NAME``, a local
Hugging Face folder, a hub id), and two forms of a parameter-space (PS) result:

- the folder written by ``evomerge export`` (or :meth:`Materializer.save_merged`): a plain Llama-style
  Hugging Face folder, used as it is;
- a PS recipe JSON file (``recipe.json`` of an export, or one dumped from the store): it is
  materialized once into ``$EVOMERGE_CACHE_DIR/ps_sources/<recipe hash>`` (default
  ``~/.cache/evomerge/ps_sources``), atomically and under a file lock, and that folder is used.

- a stored PS candidate, ``study://STUDY/NUMBER`` (the storage from ``?storage=URL`` in the ref, else the
  space's ``storage``, else the default one; see :mod:`evomerge.study_refs`): its recipe is read from the
  store and materialized like a recipe JSON file, into the same cache, keyed by the recipe's hash.

So PS + DFS is: run PS, and put ``study://PS_STUDY/N`` (or the path of its export or recipe JSON) in
the DFS space's ``models`` next to another model; one ``evomerge search`` then searches the paths.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from evomerge.cache import cache_root, file_lock
from evomerge.recipe import Recipe
from evomerge.study_refs import StudyRefError, is_study_ref, stored_recipe_json
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


def study_recipe(ref: str) -> Recipe:
    """The parameter-space recipe of the stored candidate ``ref`` names (StudyRefError: one line)."""
    text = stored_recipe_json(ref)
    try:
        data = json.loads(text)
    except ValueError:
        raise StudyRefError(f"{ref}: the stored recipe is not JSON") from None
    kind = data.get("kind", "parameter_space") if isinstance(data, dict) else None
    if kind != "parameter_space":
        raise StudyRefError(f"{ref}: the candidate is a {kind} recipe; a data-flow source must be a "
                            "parameter-space merge (or a model folder)")
    return Recipe.from_json(text)


def resolve_source(ref: str) -> str:
    """A DFS model reference as a local folder (or hub id), materializing a PS recipe (JSON file or stored
    candidate) first."""
    if is_study_ref(ref):
        return str(materialize_recipe(study_recipe(ref)))
    if is_ps_recipe_file(ref):
        return str(materialize_ps_recipe(Path(ref)))
    return resolve_ref(ref)


def materialize_ps_recipe(recipe_file: Path, root: Path | None = None) -> Path:
    """Write the PS recipe's merged model once (cached by recipe hash) and return its folder."""
    return materialize_recipe(Recipe.from_json(Path(recipe_file).read_text()), root)


def materialize_recipe(recipe: Recipe, root: Path | None = None) -> Path:
    """Write the PS recipe's merged model once (cached by recipe hash) and return its folder."""
    from evomerge.merge import Materializer  # torch: only when a PS recipe must be built

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
