"""Export a stored candidate as a Hugging Face model folder with a model card naming its recipe.

What the folder holds is the candidate's genome kind's business (:data:`evomerge.genomes.KINDS`);
this module finds the candidate in the store and checks the target.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.genomes import ExportCard, export_recipe, recipe_from_json
from evomerge.merge.build import os_error_text, output_dir_problem


class ExportError(ValueError):
    pass


def export_candidate(store, study: str, number: int, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    st = store.get_study(study)
    cand = store.get_candidate(study, number)
    if cand is None:
        raise ExportError(f"study {study!r} has no candidate {number}")
    if cand.state != "complete":
        raise ExportError(f"candidate {number} of {study!r} is {cand.state}, not complete")
    # before any model is loaded: a symlink, a file or a non-empty folder is never written over
    problem = output_dir_problem(out_dir)
    if problem is not None:
        raise ExportError(problem)
    recipe = recipe_from_json(cand.recipe_json)
    try:
        # the kinds' exporters write into a temporary folder beside the target and rename it
        return export_recipe(recipe, out_dir, ExportCard(study, number, cand.scores, st.objectives))
    except OSError as e:  # disk full, a source gone: one line; the temporary folder is already removed
        raise ExportError(f"{out_dir}: writing the model failed: {os_error_text(e)}") from None
