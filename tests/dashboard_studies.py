"""Studies for the dashboard's tests, written by real searches over the in-process pool.

``run_search`` runs a study of three objectives (and a held-out report objective) to its budget with a
scripted worker: scores come from the recipe (deterministic, a real trade-off between the objectives,
a few failures), each evaluation sleeping ``delay`` seconds so that a reader sees the study change.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from fixtures_models import make_tiny_llama_family, placeholder_tasks

from evomerge.run import InProcessPool, StudyRun
from evomerge.space import dump_space, load_space
from evomerge.store import Store

SPACE = """
name: {name}
base_model: {base}
models: [{e0}, {e1}]
genome: {{method: ties, layer_groups: model}}
objectives:
  - {{name: a, task: t1, metric: "exact_match,none"}}
  - {{name: b, task: t2, metric: "exact_match,none"}}
  - {{name: c, task: t3, metric: "exact_match,none"}}
report:
  - {{name: held, task: t4, metric: "exact_match,none"}}
algorithm: {{name: {algorithm}{settings}}}
budget: {budget}
evaluation: {{task_paths: [tasks]}}
"""
EXAMPLES = 8


class ScriptedWorker:
    delay = 0.0

    def evaluate(self, number, recipe_json, objective_names=None, front=None, fidelity=None) -> dict:
        time.sleep(ScriptedWorker.delay)
        recipe = json.loads(recipe_json)
        w = [x for g in recipe["groups"] for x in g["weights"]]
        h = int(hashlib.sha256(recipe_json.encode()).hexdigest()[:8], 16) / 16**8
        if h < 0.08:
            return {"number": number, "scores": {}, "samples": {}, "timings": {}, "worker": "scripted",
                    "error": f"RuntimeError: scripted failure of #{number} <b>not bold</b>"}
        share = sum(w[: len(w) // 2]) / max(1e-9, sum(w))
        a = round(min(1.0, max(0.0, share * (0.7 + 0.3 * h))), 3)
        b = round(min(1.0, max(0.0, (1 - share) * (0.6 + 0.4 * (1 - h)))), 3)
        c = round((a + b) / 2 * (0.5 + h / 2), 3)
        scores = {"a": a, "b": b, "c": c, "held": round(a * 0.9, 3)}
        names = objective_names or list(scores)
        samples = {n: [1.0 if (i + 0.5) / EXAMPLES < scores[n] else 0.0 for i in range(EXAMPLES)] for n in names}
        return {"number": number, "scores": {n: scores[n] for n in names}, "samples": samples,
                "timings": {"materialize_s": 0.01, "evaluate_s": ScriptedWorker.delay}, "error": None,
                "worker": "scripted"}


def make_space(tmp_path: Path, name: str = "demo", algorithm: str = "nsga2", budget: int = 16):
    models = tmp_path / "models"
    if not (models / "base").exists():
        make_tiny_llama_family(models, n_experts=2, seed=0)
    placeholder_tasks(tmp_path, ("t1", "t2", "t3", "t4"))
    p = tmp_path / f"{abs(hash(name))}.yaml"
    p.write_text(SPACE.format(name=json.dumps(name), base=models / "base", e0=models / "expert0",
                              e1=models / "expert1", algorithm=algorithm, budget=budget,
                              settings=", settings: {pop_size: 6}" if algorithm == "nsga2" else ""))
    return load_space(p)


def run_search(tmp_path: Path, url: str, name: str = "demo", algorithm: str = "nsga2", budget: int = 16,
               delay: float = 0.0, workers: int = 2) -> None:
    space = make_space(tmp_path, name, algorithm, budget)
    store = Store(url)
    try:
        store.create_study(name, dump_space(space), [{"name": o.name, "direction": o.direction}
                                                     for o in space.objectives], budget=space.budget)
        ScriptedWorker.delay = delay
        StudyRun(space, store, name, show_progress=False,
                 pool=lambda cfg: InProcessPool(ScriptedWorker, workers)).run()
    finally:
        store.close()
