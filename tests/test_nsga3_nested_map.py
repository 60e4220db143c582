"""NSGA-III (reference directions) and nested MAP run through ask/tell (map_nested); the registry's suite in
tests/test_algorithms.py runs both through resume, failures and barriers as well."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.front import hypervolume, to_minimization
from evomerge.search import REGISTRY, make_algorithm, nested_map_pairs
from evomerge.search.nsga3 import reference_directions


def _acc(coefs, task):
    c = np.asarray(coefs)
    others = np.delete(c, task)
    return 1.0 / (1.0 + np.exp(-(3.0 - 8.0 * (c[task] - 0.6) ** 2 - 2.0 * np.sum(others**2))))


def test_nsga3_sizes_its_population_from_the_reference_directions():
    dirs = reference_directions(3)
    assert dirs.shape == (28, 3) and np.allclose(dirs.sum(axis=1), 1.0)
    algo = make_algorithm("nsga3", dim=5, directions=["maximize"] * 3, seed=0)
    assert algo.pop_size == 28
    first = algo.ask(1000)
    assert len(first) == 28
    algo5 = make_algorithm("nsga3", dim=5, directions=["minimize"] * 2, seed=0, n_partitions=5)
    assert algo5.pop_size == 8  # 6 directions, rounded up to a multiple of 4
    with pytest.raises(ValueError, match="n_partitions"):
        make_algorithm("nsga3", dim=5, directions=["minimize"] * 2, seed=0, n_partitions=0)


def test_nsga3_spreads_over_three_objectives():
    """DTLZ2-like sphere: NSGA-III's front covers more hypervolume than random search's at equal budget."""

    def f(x):
        x = np.asarray(x)
        g = float(np.sum((x[2:] - 0.5) ** 2))
        a, b = x[0] * np.pi / 2, x[1] * np.pi / 2
        return [(1 + g) * np.cos(a) * np.cos(b), (1 + g) * np.cos(a) * np.sin(b), (1 + g) * np.sin(a)]

    def run(name):
        algo = make_algorithm(name, dim=6, directions=["minimize"] * 3, seed=1)
        vals = []
        while len(vals) < 28 * 8:
            props = algo.ask(64)
            algo.tell([(p.key, f(p.x)) for p in props])
            vals += [f(p.x) for p in props]
        return hypervolume(to_minimization(vals, ["minimize"] * 3), np.array([1.5, 1.5, 1.5]))

    assert run("nsga3") > run("random")


def _nested(n=4, **settings):
    return make_algorithm("map_nested", dim=n, directions=["maximize"] * n, seed=0,
                          bounded=[True] * n, **settings)


def _drive(algo, budget=10_000):
    told = 0
    while told < budget:
        props = algo.ask(5)
        if not props:
            break
        algo.tell([(p.key, [float(_acc(p.x, t)) for t in range(algo.n_obj)]) for p in props])
        told += len(props)
    return told


def test_nested_map_steps_match_the_planning_function():
    """Run through ask/tell, nested MAP chooses the merges nested_map_pairs plans with the same settings."""
    n = 4
    ms = {"n_front": 6, "nsga_pop_size": 40, "nsga_generations": 60}
    algo = _nested(n, map_settings=ms, final_front_rounds=1)
    assert algo.settings["objective_groups"] is None and algo.objective_groups == [[0], [1], [2], [3]]
    first = algo.ask(100)
    # the first pair is sources 0 and 1: the others are left out
    assert all(p.x[2] == 0.0 and p.x[3] == 0.0 for p in first)
    algo.tell([(p.key, [float(_acc(p.x, t)) for t in range(n)]) for p in first])
    _drive(algo)
    assert algo.done() and algo.ask(5) == []

    def evaluate(coefs, groups):
        return [float(np.mean([_acc(coefs, t) for t in g])) for g in groups]

    plan = nested_map_pairs(n, evaluate, direction="maximize", link="sigmoid", seed=0, map_settings=ms)
    pool = algo.pool
    assert [g["members"] for g in pool] == [[0, 1], [2, 3]]
    for got, step in zip(pool, plan["steps"][:2], strict=True):
        assert got["coefficients"] == pytest.approx(step["coefficients"])


def test_nested_map_final_step_refines_while_there_is_budget_and_resumes():
    algo = _nested(3)
    _drive(algo, budget=120)
    assert not algo.done() and len(algo.pool) == 2  # the last pair keeps refining its front
    state = json.loads(json.dumps(algo.state_dict(), allow_nan=False))
    twin = _nested(3)
    twin.load_state_dict(state)
    assert [p.x for p in twin.ask(7)] == [p.x for p in algo.ask(7)]


def test_nested_map_refuses_what_it_cannot_mean():
    with pytest.raises(ValueError, match="objective_groups"):
        _nested(3, objective_groups=[[0], [1]])
    with pytest.raises(ValueError, match="front_rounds"):
        _nested(3, map_settings={"front_rounds": 2})
    with pytest.raises(ValueError, match="multiple"):
        make_algorithm("map_nested", dim=5, directions=["maximize"], seed=0, n_sources=2)
    assert {"nsga3", "map_nested"} <= set(REGISTRY)


def test_nested_map_genotype_follows_the_layout():
    """Two layer groups of (weight, density) per source plus one param: every group gets the pair's weights,
    densities 1 and the param mid-range."""
    algo = make_algorithm("map_nested", dim=2 * (3 * 2 + 1), directions=["maximize"] * 3, seed=0,
                          n_sources=3, genes_per_source=2, group_params=1)
    for p in algo.ask(20):
        x = np.asarray(p.x).reshape(2, 7)
        assert np.array_equal(x[0], x[1])
        assert x[0, 4] == 0.0 and list(x[0, [1, 3, 5]]) == [1.0, 1.0, 1.0] and x[0, 6] == 0.5
