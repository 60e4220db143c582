"""What merging the demo zoo's experts gives without a search: base, experts, naive merges.

    python bench/zoo_report.py [--study demo --storage sqlite:///evomerge.db]

Scores (real lm-eval, the demo's task YAMLs) of the base, each expert, uniform task arithmetic
(θ0 + Σ 0.5·τ and θ0 + Σ 1.0·τ) and TIES at its defaults (density 0.5, weight 1, normalize) on the
search and test splits of the experts' tasks and of the cross task. With --study, two members of that
study's front are added: the best balanced one (the largest min over the experts' tasks of search
score / expert's search score) and the one with the best cross search-split score. Prints a table and
last `RESULT <json>`; with --study it holds ``cross_test`` (``best_source``: the best held-out cross
test score of base and experts; ``searched``: the best-cross member's) and ``kept`` (the balanced
member's test scores as fractions of each expert's test score on its own task).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evomerge.merge import Materializer  # noqa: E402
from evomerge.objectives import Evaluator  # noqa: E402
from evomerge.recipe import LayerGroup, Recipe  # noqa: E402
from evomerge.space import Objective  # noqa: E402
from evomerge.zoo import ZOO_PREFIX, ZOO_VERSION, build_zoo, parse_zoo_uri  # noqa: E402

TASKS = ROOT / "search_spaces" / "demo_tasks"
COLUMNS = ["arith", "script", "cross", "arith_test", "script_test", "cross_test"]
SOURCES = ("base", "arith expert", "script expert")


def objectives() -> list[Objective]:
    names = {"arith": "demo_arith_search", "script": "demo_script_search", "cross": "demo_cross_search",
             "arith_test": "demo_arith_test", "script_test": "demo_script_test", "cross_test": "demo_cross_test"}
    return [Objective(name=k, task=v, metric="exact_match,none") for k, v in names.items()]


def uniform(method: str, base: str, sources: list[str], weight: float, density: float | None = None) -> Recipe:
    g = LayerGroup(name="all", kind="all", weights=[weight] * len(sources),
                   densities=None if density is None else [density] * len(sources))
    return Recipe(base=base, sources=sources, method=method, groups=[g])


def merged_zoo_version(front: list) -> int | None:
    """The zoo version a study merged (``zoo://v1/arith`` names version 1), None if no zoo model."""
    for c in front:
        j = json.loads(c.recipe_json)
        for ref in [j.get("base") or "", *j.get("sources", [])]:
            if ref.startswith(ZOO_PREFIX):
                return parse_zoo_uri(ref)[0]
    return None


def _fail(msg: str) -> None:
    print(f"zoo_report: {msg}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default=None)
    ap.add_argument("--storage", default=None)
    ap.add_argument("--zoo-version", type=int, default=None, help="default: the zoo version the study's space names")
    args = ap.parse_args()
    version = args.zoo_version or ZOO_VERSION
    front = None
    if args.study:
        from evomerge.store import Store, default_storage_url
        from evomerge.store.errors import StudyNotFound

        store = Store(args.storage or default_storage_url())
        try:
            front = store.front(args.study)
            for c in front:
                Recipe.from_json(c.recipe_json)
        except StudyNotFound as e:
            _fail(str(e))
        except ValueError:  # a pydantic error: not a parameter-space recipe
            _fail(f"{args.study} is not a parameter-space study (its held-out scores: evomerge front {args.study})")
        if args.zoo_version is None:
            version = merged_zoo_version(front) or version
    zoo = build_zoo(log=lambda m: print(m, file=sys.stderr), version=version)
    base, experts = str(zoo / "base"), [str(zoo / "arith"), str(zoo / "script")]
    tok = AutoTokenizer.from_pretrained(base)
    ev = Evaluator(objectives(), [str(TASKS)], tok, 64, cache_dir=tempfile.mkdtemp())
    rows: dict[str, dict[str, float]] = {}

    def score(name: str, model) -> None:
        rows[name] = {k: round(r.value, 4) for k, r in ev.evaluate(model).items()}

    for name, path in [("base", base), ("arith expert", experts[0]), ("script expert", experts[1])]:
        score(name, AutoModelForCausalLM.from_pretrained(path))
    mat = Materializer(base, experts)
    model = mat.new_model()
    naive = {"task arithmetic 0.5": uniform("task_arithmetic", base, experts, 0.5),
             "task arithmetic 1.0": uniform("task_arithmetic", base, experts, 1.0),
             "TIES default": uniform("ties", base, experts, 1.0, 0.5)}
    balanced_row = cross_row = None
    if front:
        own = {"arith": rows["arith expert"]["arith"], "script": rows["script expert"]["script"]}
        best = max(front, key=lambda c: min(c.scores[k] / own[k] for k in own))
        balanced_row = f"search best balanced (#{best.number})"
        naive[balanced_row] = Recipe.from_json(best.recipe_json)
        if all("cross" in c.scores for c in front):
            top = max(front, key=lambda c: c.scores["cross"])
            cross_row = f"search best cross (#{top.number})"
            naive[cross_row] = Recipe.from_json(top.recipe_json)
    for name, recipe in naive.items():
        mat.apply(recipe.model_copy(update={"base": base, "sources": experts}), model)
        score(name, model)
    own = {"arith": rows["arith expert"]["arith"], "script": rows["script expert"]["script"]}
    print(f"{'model':<34}" + "".join(f"{c:>12}" for c in COLUMNS) + "   % of expert (arith / script)")
    for name, r in rows.items():
        pct = f"{100 * r['arith'] / own['arith']:.0f}% / {100 * r['script'] / own['script']:.0f}%"
        print(f"{name:<34}" + "".join(f"{r[c]:>12.3f}" for c in COLUMNS) + f"   {pct}")
    result: dict = {"zoo": zoo.name, "scores": rows}
    if balanced_row:
        result["kept"] = {k: round(rows[balanced_row][f"{k}_test"] / rows[f"{k} expert"][f"{k}_test"], 4)
                          for k in ("arith", "script")}
    if cross_row:
        best_source = max(rows[n]["cross_test"] for n in SOURCES)
        searched = rows[cross_row]["cross_test"]
        result["cross_test"] = {"best_source": best_source, "searched": searched,
                                "ratio": round(searched / best_source, 3) if best_source else None}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
