"""What merging the demo zoo's experts gives without a search: base, experts, naive merges.

    python bench/zoo_report.py [--study demo --storage sqlite:///evomerge.db]

Scores (real lm-eval, the demo's task YAMLs) of the base, each expert, uniform task arithmetic
(θ0 + Σ 0.5·τ and θ0 + Σ 1.0·τ) and TIES at its defaults (density 0.5, weight 1, normalize) on the
search split of both experts' tasks, their test split and the held-out cross task. With --study, the
best balanced member of that study's front (the largest min over tasks of score / expert's score) is
added. Prints a table and last `RESULT <json>`.
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
from evomerge.zoo import build_zoo  # noqa: E402

TASKS = ROOT / "search_spaces" / "demo_tasks"
COLUMNS = ["arith", "script", "arith_test", "script_test", "cross_test"]


def objectives() -> list[Objective]:
    names = {"arith": "demo_arith_search", "script": "demo_script_search", "arith_test": "demo_arith_test",
             "script_test": "demo_script_test", "cross_test": "demo_cross_test"}
    return [Objective(name=k, task=v, metric="exact_match,none") for k, v in names.items()]


def uniform(method: str, base: str, sources: list[str], weight: float, density: float | None = None) -> Recipe:
    g = LayerGroup(name="all", kind="all", weights=[weight] * len(sources),
                   densities=None if density is None else [density] * len(sources))
    return Recipe(base=base, sources=sources, method=method, groups=[g])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default=None)
    ap.add_argument("--storage", default=None)
    args = ap.parse_args()
    zoo = build_zoo(log=lambda m: print(m, file=sys.stderr))
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
    if args.study:
        from evomerge.store import Store, default_storage_url

        store = Store(args.storage or default_storage_url())
        own = {"arith": rows["arith expert"]["arith"], "script": rows["script expert"]["script"]}
        front = store.front(args.study)
        best = max(front, key=lambda c: min(c.scores[k] / own[k] for k in own))
        naive[f"search best balanced (#{best.number})"] = Recipe.from_json(best.recipe_json)
    for name, recipe in naive.items():
        mat.apply(recipe.model_copy(update={"base": base, "sources": experts}), model)
        score(name, model)
    own = {"arith": rows["arith expert"]["arith"], "script": rows["script expert"]["script"]}
    print(f"{'model':<34}" + "".join(f"{c:>12}" for c in COLUMNS) + "   % of expert (arith / script)")
    for name, r in rows.items():
        pct = f"{100 * r['arith'] / own['arith']:.0f}% / {100 * r['script'] / own['script']:.0f}%"
        print(f"{name:<34}" + "".join(f"{r[c]:>12.3f}" for c in COLUMNS) + f"   {pct}")
    print("RESULT " + json.dumps({"zoo": zoo.name, "scores": rows}))


if __name__ == "__main__":
    main()
