"""Export a stored candidate as a Hugging Face model folder with a model card naming its recipe.

What the folder holds is the candidate's genome kind's business (:data:`evomerge.genomes.KINDS`);
this module finds the candidate in the store and checks the target.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.genomes import ExportCard, export_recipe, recipe_from_json


class ExportError(ValueError):
    pass


def export_candidate(store, study: str, number: int, out_dir: Path) -> Path:
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
    return export_recipe(recipe, out_dir, ExportCard(study, number, cand.scores, st.objectives))
