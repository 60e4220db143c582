"""One suite parametrised over every registered search algorithm (evomerge.search.REGISTRY)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from evomerge.front import hypervolume, reference_point_from_bounds, to_minimization
from evomerge.search import CMAES, REGISTRY, make_algorithm, restore_algorithm

NAMES = sorted(REGISTRY)
# Optuna's GP sampler takes seconds per proposal here (no greenlet: restarts run one after another), so the
# checks that need hundreds of proposals run it in tests/test_optuna_map.py on smaller budgets instead.
LONG_RUN_NAMES = [n for n in NAMES if not getattr(REGISTRY[n], "slow", False)]
DIM = 6
# ZDT1 reported as (f1 minimised, -f2 maximised) so that direction handling is exercised too
DIRECTIONS = ["minimize", "maximize"]
REF = reference_point_from_bounds([(0.0, 1.0), (-10.0, 0.0)], DIRECTIONS)  # minimisation form


def zdt1(x):
    x = np.asarray(x, dtype=float)
    f1 = x[0]
    g = 1.0 + 9.0 * float(np.mean(x[1:]))
    f2 = g * (1.0 - math.sqrt(f1 / g))
    return [float(f1), -float(f2)]


def objective(key, x):
    """ZDT1 with a deterministic sprinkle of failures."""
    if key % 13 == 5:
        return None
    return zdt1(x)


def make(name, seed=0, **settings):
    return make_algorithm(name, dim=DIM, directions=DIRECTIONS, seed=seed, **settings)


def quality(algo, values):
    """Higher is better: hypervolume for Pareto algorithms, minus the best weighted sum otherwise."""
    ok = [v for v in values if v is not None]
    F = to_minimization(ok, DIRECTIONS)
    if algo.multi_objective:
        return hypervolume(F, REF)
    return -float(np.min(F @ np.asarray(algo.weights)))


def sync_run(algo, budget, batch=4):
    """Ask/evaluate/tell in small batches until ``budget`` evaluations; returns the values in order."""
    values = []
    while len(values) < budget:
        props = algo.ask(batch)
        assert props, "ask returned nothing with nothing outstanding"
        algo.tell([(p.key, objective(p.key, p.x)) for p in props])
        values.extend(objective(p.key, p.x) for p in props)
    return values


def roundtrip(algo, name, seed=0, **settings):
    state = json.loads(json.dumps(algo.state_dict(), allow_nan=False))
    fresh = make(name, seed=seed, **settings)
    fresh.load_state_dict(state)
    return fresh


def async_run(name, steps, interrupt_after=(), seed=0):
    """An asynchronous driver: asks varying amounts, tells random subsets out of order, with failures,
    duplicate reports and early reports for keys not handed out. Its own choices depend only on its
    RNG and on what the algorithm proposed, so two exact algorithms give identical traces.

    ``interrupt_after``: tell indices after which the algorithm is saved, JSON round-tripped and loaded
    into a fresh instance. Returns (trace, number of outstanding keys at each interruption)."""
    rng = random.Random(1234)
    algo = make(name, seed=seed)
    pool = []
    trace = []
    outstanding_at = []
    for step in range(steps):
        props = algo.ask(rng.randint(1, 5))
        trace.append([(p.key, p.x, p.parents, p.generation) for p in props])
        pool.extend(props)
        if not pool:
            continue
        rng.shuffle(pool)
        k = rng.randint(1, len(pool))
        told, pool = pool[:k], pool[k:]
        results = [(p.key, objective(p.key, p.x)) for p in told]
        if rng.random() < 0.3:  # a retried Ray task reports again, with a different value
            p = rng.choice(told)
            results.append((p.key, [0.0, 0.0]))
        if rng.random() < 0.2:  # a key nobody was handed yet
            results.append((10_000 + step, [0.0, 0.0]))
        algo.tell(results)
        if step in interrupt_after:
            outstanding_at.append(len(pool))
            assert sorted(algo.outstanding) == sorted(p.key for p in pool)
            algo = roundtrip(algo, name, seed=seed)
            assert sorted(algo.outstanding) == sorted(p.key for p in pool)
    return trace, outstanding_at


@pytest.mark.parametrize("name", LONG_RUN_NAMES)
def test_improves_within_budget(name):
    budget = 200
    algo = make(name)
    values = sync_run(algo, budget)
    first = values[:16]
    assert quality(algo, values) > quality(algo, first)
    if name != "random":
        baseline = quality(algo, sync_run(make("random"), budget))
        assert quality(algo, values) > baseline


@pytest.mark.parametrize("name", LONG_RUN_NAMES)
def test_deterministic_under_seed_and_isolated_from_global_rng(name):
    a, _ = async_run(name, 40)
    np.random.seed(99)
    random.seed(99)
    before = np.random.get_state()[1].copy(), random.getstate()
    b, _ = async_run(name, 40)
    # the algorithm neither depends on nor disturbs the caller's global RNGs
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    assert a == b
    c, _ = async_run(name, 40, seed=1)
    assert a != c


@pytest.mark.parametrize("name", LONG_RUN_NAMES)
def test_resume_is_exact(name):
    steps = 60
    reference, _ = async_run(name, steps)
    # interrupt at single points, several points, and after every tell
    for points in ([0], [7], [23], [3, 11, 30, 31, 45], list(range(steps))):
        resumed, outstanding = async_run(name, steps, interrupt_after=set(points))
        assert resumed == reference, f"diverged when interrupted after tells {points}"
    _, outstanding = async_run(name, steps, interrupt_after=set(range(steps)))
    assert any(n > 0 for n in outstanding), "no interruption happened with proposals outstanding"


@pytest.mark.parametrize("name", NAMES)
def test_state_is_plain_json_and_restorable_alone(name):
    algo = make(name)
    props = algo.ask(5)
    algo.tell([(props[0].key, [0.5, -0.5]), (props[1].key, None)])
    state = algo.state_dict()
    text = json.dumps(state, allow_nan=False)
    other = restore_algorithm(json.loads(text))
    assert type(other) is type(algo)
    assert other.outstanding == algo.outstanding
    assert [(p.key, p.x) for p in other.ask(7)] == [(p.key, p.x) for p in algo.ask(7)]
    # a state from differently-built instance is refused
    wrong = make(name, seed=5)
    with pytest.raises(ValueError):
        wrong.load_state_dict(json.loads(text))


@pytest.mark.parametrize("name", LONG_RUN_NAMES)
def test_failures_do_not_crash(name):
    algo = make(name)
    # whole generations fail, then NaN/inf values, then normal results
    for round_ in range(6):
        props = algo.ask(8)
        if not props:
            props_keys = algo.outstanding
            assert props_keys
            algo.tell([(k, None) for k in props_keys])
            continue
        for p in props:
            assert len(p.x) == DIM and all(0.0 <= v <= 1.0 for v in p.x)
        if round_ < 3:
            res = [(p.key, None) for p in props]
        elif round_ == 3:
            res = [(p.key, [float("nan"), 1.0]) if i % 2 else (p.key, [float("inf"), 0.0])
                   for i, p in enumerate(props)]
        else:
            res = [(p.key, zdt1(p.x)) for p in props]
        algo.tell(res)
    json.dumps(algo.state_dict(), allow_nan=False)
    values = sync_run(algo, 48)
    assert sum(v is not None for v in values) > 0


@pytest.mark.parametrize("name", NAMES)
def test_generation_barrier(name):
    algo = make(name)
    first = algo.ask(2)
    assert len(first) == 2
    rest = algo.ask(1000)
    keys = [p.key for p in first + rest]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    if not REGISTRY[name].generational:
        assert len(rest) == 1000
        return
    gen_size = len(first) + len(rest)
    assert gen_size < 1000 and all(p.generation == 0 for p in first + rest)
    assert algo.ask(3) == []  # waiting on the generation
    everything = first + rest
    algo.tell([(p.key, zdt1(p.x)) for p in everything[:-1]])
    assert algo.ask(3) == []
    algo.tell([(everything[-1].key, zdt1(everything[-1].x))])
    nxt = algo.ask(3)
    assert len(nxt) == 3 and all(p.generation == 1 for p in nxt)
    assert nxt[0].key == everything[-1].key + 1


@pytest.mark.parametrize("name", NAMES)
def test_duplicate_and_unknown_tells_are_ignored(name):
    algo = make(name)
    props = algo.ask(4)
    algo.tell([(props[0].key, zdt1(props[0].x))])
    snapshot = json.dumps(algo.state_dict())
    algo.tell([(props[0].key, [0.0, 0.0]), (props[0].key, None), (987_654, [0.0, 0.0]), (-1, None)])
    assert json.dumps(algo.state_dict()) == snapshot
    with pytest.raises(ValueError):
        algo.tell([(props[1].key, [1.0, 2.0, 3.0])])  # wrong number of objectives is a bug, not a failure


def test_registry_and_errors():
    assert {"cmaes", "nsga2", "random"} <= set(REGISTRY)
    with pytest.raises(ValueError, match="cmaes"):
        make_algorithm("nope", dim=2, directions=["minimize"], seed=0)
    with pytest.raises(ValueError, match="unknown setting"):
        make("cmaes", popsze=5)
    with pytest.raises(ValueError):
        make_algorithm("cmaes", dim=2, directions=["upward"], seed=0)


def test_cmaes_paper_defaults_and_clipping():
    algo = make_algorithm("cmaes", dim=10, directions=["maximize"], seed=3)
    assert isinstance(algo, CMAES)
    assert algo.popsize == 4 + int(3 * math.log(10))
    assert algo.settings["sigma0"] == pytest.approx(1 / 6) and algo.settings["x0"] == 0.5
    wide = make_algorithm("cmaes", dim=10, directions=["maximize"], seed=3, sigma0=2.0, popsize=6)
    props = wide.ask(6)
    assert len(props) == 6
    xs = np.array([p.x for p in props])
    assert xs.min() >= 0.0 and xs.max() <= 1.0 and np.any((xs == 0.0) | (xs == 1.0))
    raw = np.array(wide._cur["raw"])  # cma is told the unclipped samples
    assert raw.min() < 0.0 or raw.max() > 1.0


def test_cmaes_weights_scalarise():
    # maximise -|x - 0.8|^2 (weight 1) while a second objective with weight 0 is ignored
    algo = make_algorithm("cmaes", dim=4, directions=["maximize", "minimize"], seed=0, weights=[1.0, 0.0])
    best = -np.inf
    for _ in range(30):
        props = algo.ask(100)
        res = []
        for p in props:
            f = -float(np.sum((np.asarray(p.x) - 0.8) ** 2))
            best = max(best, f)
            res.append((p.key, [f, float(np.sum(p.x))]))
        algo.tell(res)
    assert best > -1e-3


@pytest.mark.parametrize("name", NAMES)
def test_outstanding_tracks_asked_minus_told(name):
    algo = make(name)
    asked = []
    for _ in range(3):
        asked += [p.key for p in algo.ask(3)]
    assert sorted(algo.outstanding) == sorted(asked)
    told = asked[: len(asked) // 2]
    algo.tell([(k, [0.5, -0.5]) for k in told])
    assert sorted(algo.outstanding) == sorted(set(asked) - set(told))
