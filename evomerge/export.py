"""Export a stored candidate as a Hugging Face model folder with a model card naming its recipe.

What the folder holds is the candidate's genome kind's business (:data:`evomerge.genomes.KINDS`);
this module finds the candidate in the store and checks the target.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.files import os_error_text, output_dir_problem
from evomerge.genomes import ExportCard, export_recipe, recipe_from_json
from evomerge.space import space_origin


class ExportError(ValueError):
    pass


def export_card(store, st, number: int, scores: dict[str, float]) -> ExportCard:
    """What the model card says of how the candidate was found, from the study's stored space."""
    try:
        space = yaml.safe_load(st.space_yaml) or {}
    except yaml.YAMLError:
        space = {}
    space = space if isinstance(space, dict) else {}
    names = {o["name"] for o in st.objectives}
    report = [{"name": r["name"], "direction": r.get("direction", "maximize")}
              for r in space.get("report") or [] if isinstance(r, dict) and r.get("name") not in names]
    origin = space_origin(st.space_yaml)
    algorithm = space.get("algorithm") or {}
    counts = store.study_counts(st.name)
    found = {
        "algorithm": algorithm.get("name", "nsga2"),
        "settings": algorithm.get("settings") or {},
        "budget": st.budget,
        "seed": space.get("seed", 0),
        "complete": counts["complete"],
        "failed": counts["failed"],
        "file": origin.get("file"),
        "overrides": origin.get("overrides") or [],
    }
    return ExportCard(st.name, number, scores, list(st.objectives), report, origin.get("names") or {}, found)


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
        return export_recipe(recipe, out_dir, export_card(store, st, number, cand.scores))
    except OSError as e:  # disk full, a source gone: one line; the temporary folder is already removed
        raise ExportError(f"{out_dir}: writing the model failed: {os_error_text(e)}") from None
    except ValueError as e:  # the merge engine's own one-line errors (a tensor missing from a source, ...)
        raise ExportError(f"{out_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
