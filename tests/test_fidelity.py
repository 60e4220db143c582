"""Multi-fidelity evaluation: bounds, front test, evaluation windows, staged evaluation on a worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.fidelity import MultiFidelity, can_reach_front, optimistic_value
from evomerge.recipe import Recipe
from evomerge.space import load_space

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "search_spaces" / "demo_tasks"


def test_bounds() -> None:
    safe = MultiFidelity(bound="safe")
    # 10 of 40 examples, all wrong: at best the other 30 are right.
    assert optimistic_value([0.0] * 10, 40, "maximize", safe) == pytest.approx(0.75)
    assert optimistic_value([1.0] * 10, 40, "minimize", safe) == pytest.approx(0.25)
    hoeff = MultiFidelity(bound="hoeffding", delta=0.05)
    hi = optimistic_value([0.5] * 100, 400, "maximize", hoeff)
    assert 0.5 < hi < 0.65 and hi < optimistic_value([0.5] * 100, 400, "maximize", safe)
    assert optimistic_value([0.3, 0.7], 2, "maximize", hoeff) == pytest.approx(0.5)  # complete: exact


def test_can_reach_front() -> None:
    front = [[0.9, 0.2], [0.5, 0.6]]
    dirs = ["maximize", "maximize"]
    assert can_reach_front([0.95, 0.1], front, dirs)
    assert can_reach_front([0.6, 0.6], front, dirs)
    assert not can_reach_front([0.4, 0.5], front, dirs)
    assert not can_reach_front([0.5, 0.6], [[0.5, 0.61]], dirs)
    assert can_reach_front([0.0, 0.0], [], dirs)
    # Minimised objectives: a lower optimistic value is better.
    assert not can_reach_front([0.9, 5.0], [[0.9, 4.0]], ["maximize", "minimize"])


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from evomerge.run import worker_config
    from evomerge.workers import MergeWorker
    from evomerge.zoo import build_zoo

    zoo = build_zoo(tmp_path_factory.mktemp("zoo"), steps_scale=0.005, log=lambda m: None)
    d = tmp_path_factory.mktemp("space")
    p = d / "s.yaml"
    p.write_text(f"""
base_model: {zoo / "base"}
models: [{zoo / "arith"}, {zoo / "script"}]
genome: {{method: task_arithmetic, layer_groups: model}}
objectives:
  - {{name: arith, task: demo_arith_search, metric: "exact_match,none", limit: 40}}
  - {{name: script, task: demo_script_search, metric: "exact_match,none", limit: 24}}
evaluation: {{batch_size: 16, task_paths: [{TASKS}], multi_fidelity: {{fraction: 0.25, bound: safe}}}}
""")
    space = load_space(p)
    from evomerge.genomes import make_genome

    recipe = make_genome(space).decode([0.5, 0.5])
    return MergeWorker(worker_config(space)), recipe.canonical_json()


def test_windows_add_up_to_the_full_evaluation(worker) -> None:
    w, recipe = worker
    full = w.evaluate(1, recipe)
    assert not full["error"]
    w.materializer.apply(Recipe.from_json(recipe), w.model)
    a = w.evaluator.evaluate(w.model, w.objectives, window=(0, 10))
    b = w.evaluator.evaluate(w.model, w.objectives, window=(10, 40))
    for name in ("arith", "script"):
        assert a[name].samples + b[name].samples == full["samples"][name]
    assert len(full["samples"]["arith"]) == 40 and len(full["samples"]["script"]) == 24


def test_staged_evaluation_finishes_or_stops(worker) -> None:
    w, recipe = worker
    fid = MultiFidelity(fraction=0.25, bound="safe").model_dump()
    full = w.evaluate(1, recipe)
    # A front nothing can beat in the safe bound's sense only if it is perfect on both: finish.
    finished = w.evaluate(2, recipe, front=[[0.0, 0.0]], fidelity=fid)
    assert finished["timings"]["fidelity"] == 1.0 and "pruned" not in finished["timings"]
    assert finished["scores"] == pytest.approx(full["scores"]) and finished["samples"] == full["samples"]
    # A perfect front member dominates any candidate that got an example of each task wrong.
    stopped = w.evaluate(3, recipe, front=[[1.0, 1.0]], fidelity=fid)
    # (the tiny zoo's models are far from perfect, so the first slice has a wrong answer in each task)
    assert all(min(full["samples"][n][:10]) < 1.0 for n in ("arith", "script"))
    assert stopped["timings"]["pruned"] == 1.0
    assert stopped["timings"]["fidelity"] == pytest.approx((10 + 10) / (40 + 24))
    assert len(stopped["samples"]["arith"]) == 10
    assert stopped["scores"]["arith"] == pytest.approx(sum(full["samples"]["arith"][:10]) / 10)


def test_multi_fidelity_needs_mean_metrics(tmp_path: Path) -> None:
    from evomerge.space import SpaceError

    p = tmp_path / "s.yaml"
    p.write_text("base_model: b\nmodels: [a]\nobjectives: [{name: x, task: t, metric: 'bleu,none'}]\n"
                 "evaluation: {multi_fidelity: {fraction: 0.2}}\n")
    with pytest.raises(SpaceError, match="multi_fidelity"):
        load_space(p)
