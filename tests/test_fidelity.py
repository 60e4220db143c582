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


def test_min_gain_finishes_only_what_moves_the_front() -> None:
    from evomerge import front as frontlib

    dirs = ["maximize", "maximize"]
    ref = frontlib.reference_point_from_bounds([(0.0, 1.0)] * 2, dirs).tolist()
    front = [[0.6, 0.4], [0.4, 0.6]]  # hypervolume 0.45 (the reference point lies 0.1 below 0 on each axis)
    sliver, side = [0.61, 0.41], [0.7, 0.3]  # add 0.0071 (1.6%) and 0.04 (8.9%)
    for point, gain, finished in [(sliver, 0.0, True), (sliver, 0.015, True), (sliver, 0.02, False),
                                  (side, 0.08, True), (side, 0.1, False)]:
        assert can_reach_front(point, front, dirs, gain, ref) is finished, (point, gain)
    assert can_reach_front([0.5, 0.3], front, dirs, 0.0, ref) is False  # dominated stays dominated
    assert can_reach_front(sliver, front, dirs, 0.5, None) is True  # no reference point: dominance only
    assert MultiFidelity(min_gain=0.01).min_gain == 0.01
    with pytest.raises(ValueError):
        MultiFidelity(min_gain=1.0)


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
    assert stopped["timings"]["pruned"] == 1.0 and stopped["timings"]["estimated"] == 1.0  # a slice mean
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


# ------------------------------------------------------------------------------------ anchor subsets
def _irt(n_cand: int, n_items: int, seed: int):
    """Scores from a two-parameter item-response model: candidate ability, item difficulty and slope."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ability = rng.normal(0.0, 1.0, n_cand)
    difficulty = rng.normal(0.0, 1.5, n_items)
    slope = rng.uniform(0.5, 2.5, n_items)
    p = 1.0 / (1.0 + np.exp(-slope[None, :] * (ability[:, None] - difficulty[None, :])))
    return (rng.random((n_cand, n_items)) < p).astype(float)


def test_anchors_estimate_better_than_a_random_subset_and_say_how_well() -> None:
    import numpy as np

    from evomerge.fidelity import estimate, estimate_from_anchors, plan_anchors

    S = _irt(60, 200, 0)
    ref, new = S[:20], S[20:]
    plan = plan_anchors({"t": ref}, fraction=0.1)["t"]
    assert len(plan["indices"]) <= 20 and plan["indices"] == sorted(plan["indices"]) and plan["n"] == 200
    assert sum(plan["weights"]) == pytest.approx(1.0)
    est = np.array([estimate(plan, list(row[plan["indices"]])) for row in new])
    err = np.abs(est - new.mean(axis=1))
    plain = [estimate_from_anchors(list(row[plan["indices"]]), plan["weights"]) for row in new]
    # on data from an item-response model, cross-validation picks the Rasch estimate, and rightly
    assert plan["estimator"] == "irt" and err.mean() < np.abs(plain - new.mean(axis=1)).mean()
    rng = np.random.default_rng(1)
    rand = [np.abs(new[:, rng.choice(200, 20, replace=False)].mean(axis=1) - new.mean(axis=1)).mean()
            for _ in range(50)]
    assert err.mean() < np.mean(rand)  # better than a random subset's mean of the same size
    rmse = float(np.sqrt(np.mean(err**2)))
    assert 0.4 * rmse < plan["error"] < 2.5 * rmse  # the cross-validated error bar is of the right size
    assert plan_anchors({"t": ref}, fraction=0.1) == plan_anchors({"t": ref}, fraction=0.1)  # deterministic


def test_subset_window_scores_exactly_those_examples(worker) -> None:
    from evomerge.objectives.base import Subset

    w, recipe = worker
    full = w.evaluate(1, recipe)
    w.materializer.apply(Recipe.from_json(recipe), w.model)
    part = w.evaluator.evaluate(w.model, w.objectives, window=Subset([3, 7, 20, 30]))
    assert part["arith"].samples == [full["samples"]["arith"][i] for i in (3, 7, 20, 30)]
    assert part["script"].samples == [full["samples"]["script"][i] for i in (3, 7, 20)]  # 24 examples


def test_anchored_evaluation_finishes_front_candidates_and_estimates_the_rest(worker) -> None:
    import numpy as np

    w, recipe = worker
    full = w.evaluate(1, recipe)
    plan = {"arith": {"indices": [0, 9, 21, 33], "weights": [0.25, 0.25, 0.25, 0.25], "error": 0.05, "n": 40},
            "script": {"indices": [2, 11], "weights": [0.5, 0.5], "error": 0.1, "n": 24}}
    fid = {**MultiFidelity(method="anchors", fraction=0.1).model_dump(), "anchors": plan}
    finished = w.evaluate(2, recipe, front=[[0.0, 0.0]], fidelity=fid)
    assert not finished["error"] and finished["timings"]["fidelity"] == 1.0
    assert finished["scores"] == pytest.approx(full["scores"]) and finished["samples"] == full["samples"]
    est = {n: sum(full["samples"][n][i] * wt for i, wt in zip(p["indices"], p["weights"], strict=True))
           for n, p in plan.items()}
    err = sum(abs(est[n] - full["scores"][n]) for n in plan) / 2
    assert finished["timings"]["anchor_error"] == pytest.approx(err)
    stopped = w.evaluate(3, recipe, front=[[1.0, 1.0]], fidelity=fid)
    assert stopped["timings"]["pruned"] == 1.0 and stopped["timings"]["estimated"] == 1.0
    assert stopped["timings"]["fidelity"] == pytest.approx(6 / 64)
    assert stopped["scores"] == pytest.approx(est) and stopped["samples"] == {"arith": [], "script": []}
    # a front its estimate (z = 0) passes by a sliver: finished when the sliver is gain enough, else estimated
    from evomerge import front as frontlib

    dirs = ["maximize", "maximize"]
    ref = frontlib.reference_point_from_bounds([(0.0, 1.0)] * 2, dirs).tolist()
    sliver = [[est["arith"] - 0.002, est["script"] - 0.002]]
    F = frontlib.to_minimization(sliver, dirs)
    hv = frontlib.hypervolume(F, ref)
    g = (frontlib.hypervolume(np.vstack([F, frontlib.to_minimization([list(est.values())], dirs)]), ref) - hv) / hv
    assert 0.0 < g < 0.4, (est, g)
    for gain, finished in [(g / 2, True), (2 * g, False)]:
        with_gain = {**fid, "z": 0.0, "min_gain": gain, "reference": ref}
        t = w.evaluate(5, recipe, front=sliver, fidelity=with_gain)["timings"]
        assert (t["fidelity"] == 1.0) is finished and (t.get("estimated") == 1.0) is not finished, gain
    # no plan yet (too few fully scored candidates): scored in full
    early = w.evaluate(4, recipe, front=[[1.0, 1.0]], fidelity={**fid, "anchors": {}})
    assert early["samples"] == full["samples"] and "pruned" not in early["timings"]


def test_anchor_plan_waits_for_reference_candidates(tmp_path: Path) -> None:
    import numpy as np

    from evomerge.run.anchors import AnchorPlanner
    from evomerge.store import Store

    p = tmp_path / "s.yaml"
    p.write_text(f"""
base_model: org/base
models: [org/a]
genome: {{num_layers: 2}}
objectives:
  - {{name: arith, task: demo_arith_search, metric: "exact_match,none"}}
  - {{name: n, kind: cost, measure: params, direction: minimize}}
evaluation: {{task_paths: [{TASKS}], multi_fidelity: {{method: anchors, fraction: 0.1, min_reference: 4,
                                                   confirm: 0.3, confirm_steps: 2}}}}
""")
    space = load_space(p)
    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    store.create_study("s", "", [{"name": "arith", "direction": "maximize"}, {"name": "n", "direction": "minimize"}],
                       budget=10)
    planner = AnchorPlanner(store, "s", space, space.evaluation.multi_fidelity)
    S = _irt(6, 50, 2)
    for i, row in enumerate(S):
        num = store.add_candidate("s", proposal_key=i, genome=[0.0], recipe_json="{}", recipe_hash=f"h{i}")
        store.mark_running("s", num)
        pruned = {"pruned": 1.0} if i == 5 else None  # an estimate is no reference
        store.complete_candidate("s", num, {"arith": float(row.mean()), "n": 1.0},
                                 {"arith": list(row) if not pruned else []}, pruned)
        plan = planner.plan()
        assert (plan == {}) == (i < 3), i
    assert set(plan) == {"arith"} and plan["arith"]["n"] == 50 and len(plan["arith"]["indices"]) <= 5
    assert len(plan["arith"]["between"]) == 1  # the space's confirm_steps reach the plan
    assert np.isfinite(plan["arith"]["error"])


def test_a_negative_z_finishes_only_estimates_past_the_front_by_a_margin() -> None:
    from evomerge.fidelity import estimate_bounds

    est, err, front = [0.5, 0.5], 0.1, [[0.45, 0.45]]
    for z, finished in [(2.0, True), (0.0, True), (-1.0, False)]:
        bound = [estimate_bounds(v, err, z, "maximize") for v in est]
        assert can_reach_front(bound, front, ["maximize", "maximize"]) is finished, z
    assert estimate_bounds(0.5, 0.1, -1.0, "minimize") == pytest.approx(0.6)
    assert MultiFidelity(method="anchors", z=-0.5).z == -0.5
    with pytest.raises(ValueError):
        MultiFidelity(method="anchors", z=-6)


def test_a_confirm_stage_is_a_larger_subset_holding_the_anchors_with_a_smaller_error_bar() -> None:
    from evomerge.fidelity import plan_anchors

    ref = _irt(30, 200, 3)
    plan = plan_anchors({"t": ref}, fraction=0.05, confirm=0.25)["t"]
    second = plan["confirm"]
    assert set(plan["indices"]) < set(second["indices"]) and second["indices"] == sorted(second["indices"])
    assert len(plan["indices"]) <= 10 < len(second["indices"]) <= 60 and second["n"] == 200
    assert sum(second["weights"]) == pytest.approx(1.0) and min(second["weights"]) > 0.0
    assert second["estimator"] == "mean" and second["difficulty"] is None
    assert second["error"] < plan["error"]  # more anchors, a tighter estimate
    assert "confirm" not in plan_anchors({"t": ref}, fraction=0.05)["t"] and "between" not in plan
    # in steps: the anchors, then the heaviest of the confirm subset's other anchors, then all of them
    stepped = plan_anchors({"t": ref}, fraction=0.05, confirm=0.25, confirm_steps=3)["t"]
    assert stepped["confirm"] == second and stepped["indices"] == plan["indices"]
    sets = [set(plan["indices"]), *(set(b["indices"]) for b in stepped["between"]), set(second["indices"])]
    assert len(sets) == 4 and all(a < b for a, b in zip(sets[:-1], sets[1:], strict=True)), [len(x) for x in sets]
    extra = len(sets[-1]) - len(sets[0])
    assert [len(x) - len(sets[0]) for x in sets[1:3]] == [round(extra / 3), round(2 * extra / 3)]
    for b in stepped["between"]:
        assert sum(b["weights"]) == pytest.approx(1.0) and b["estimator"] == "mean" and b["error"] > 0
    assert plan_anchors({"t": ref}, fraction=0.05, confirm=0.25) == plan_anchors({"t": ref}, fraction=0.05,
                                                                                  confirm=0.25)
    with pytest.raises(ValueError, match="larger anchor subset"):
        MultiFidelity(method="anchors", fraction=0.2, confirm=0.1)
    with pytest.raises(ValueError, match="method: anchors"):
        MultiFidelity(fraction=0.05, confirm=0.25)
    with pytest.raises(ValueError, match="it needs confirm"):
        MultiFidelity(method="anchors", fraction=0.05, confirm_steps=2)


def test_a_candidate_passing_the_anchors_is_confirmed_on_the_larger_subset_before_it_is_finished(worker) -> None:
    w, recipe = worker
    full = w.evaluate(1, recipe)

    def entry(idx: list[int], n: int, error: float) -> dict:
        return {"indices": idx, "weights": [1.0 / len(idx)] * len(idx), "error": error, "n": n}

    def plan(e1: float) -> dict:
        return {"arith": {**entry([0, 9, 21, 33], 40, e1), "confirm": entry([0, 5, 9, 14, 21, 27, 33, 38], 40, 0.5)},
                "script": {**entry([2, 11], 24, e1), "confirm": entry([2, 6, 11, 17, 20], 24, 0.5)}}

    def run(front: list[list[float]], e1: float, confirm_z: float) -> dict:
        fid = MultiFidelity(method="anchors", fraction=0.1, z=2.0, confirm=0.2, confirm_z=confirm_z).model_dump()
        res = w.evaluate(2, recipe, front=front, fidelity={**fid, "anchors": plan(e1)})
        assert not res["error"], res["error"]
        return res

    # the anchors' estimate (error 0) is dominated by a perfect front: stopped after the anchors
    first = run([[1.0, 1.0]], 0.0, 2.0)
    assert first["timings"]["estimated"] == 1.0 and first["timings"]["fidelity"] == pytest.approx(6 / 64)
    # the anchors' optimistic bound (error 0.5, z 2) passes; the larger subset's pessimistic one (z -5) does not
    second = run([[0.01, 0.01]], 0.5, -5.0)
    assert second["timings"]["estimated"] == 1.0 and second["timings"]["fidelity"] == pytest.approx(13 / 64)
    conf = plan(0.5)
    expect = {n: sum(full["samples"][n][i] for i in conf[n]["confirm"]["indices"]) / len(conf[n]["confirm"]["indices"])
              for n in conf}
    assert second["scores"] == pytest.approx(expect) and second["samples"] == {"arith": [], "script": []}
    # a step on the way (anchors plus two more examples each) rules it out first: stopped there
    fid = MultiFidelity(method="anchors", fraction=0.1, z=2.0, confirm=0.2, confirm_steps=2).model_dump()
    stepped = plan(0.5)
    stepped["arith"]["between"] = [entry([0, 5, 9, 21, 27, 33], 40, 0.0)]
    stepped["script"]["between"] = [entry([2, 6, 11, 17], 24, 0.0)]
    res = w.evaluate(2, recipe, front=[[1.0, 1.0]], fidelity={**fid, "anchors": stepped})
    assert res["timings"]["estimated"] == 1.0 and res["timings"]["fidelity"] == pytest.approx(10 / 64)
    # both gates pass: finished, every example scored once, the same scores as a full evaluation
    done = run([[0.01, 0.01]], 0.5, 2.0)
    assert done["timings"]["fidelity"] == 1.0 and "estimated" not in done["timings"]
    assert done["samples"] == full["samples"] and done["scores"] == pytest.approx(full["scores"])
    assert done["timings"]["anchor_error"] == pytest.approx(
        sum(abs(expect[n] - full["scores"][n]) for n in conf) / 2)
