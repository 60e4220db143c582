"""Optuna samplers (rebuild from the store) and MAP (quadratic surrogates, Bayesian and nested MAP).

The shared suite (tests/test_algorithms.py) also runs every one of these through its checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evomerge.search import MAP, make_algorithm, nested_map_pairs, restore_algorithm
from evomerge.search.map import features, fit_quadratic, link_apply, term_names


def roundtrip(algo):
    return restore_algorithm(json.loads(json.dumps(algo.state_dict(), allow_nan=False)))


# --------------------------------------------------------------------------- Optuna
def sphere2(x):
    x = np.asarray(x)
    return [float(np.sum((x - 0.3) ** 2)), float(np.sum((x - 0.7) ** 2))]


def test_optuna_rebuild_from_store_is_exact():
    """State = plain trials; a study rebuilt from them proposes what the live one proposes."""
    live = make_algorithm("optuna_nsga2", dim=3, directions=["minimize", "minimize"], seed=4,
                          population_size=6)
    for _ in range(5):
        props = live.ask(5)
        live.tell([(p.key, None if p.key % 7 == 3 else sphere2(p.x)) for p in props[:-1]])
    state = json.loads(json.dumps(live.state_dict(), allow_nan=False))
    assert {t["state"] for t in state["trials"]} == {"running", "complete", "fail"}
    assert all(set(t) == {"key", "x", "state", "values", "system_attrs"} for t in state["trials"])
    rebuilt = restore_algorithm(state)
    assert rebuilt.state_dict() == state
    assert rebuilt.outstanding == live.outstanding and live.outstanding
    assert [(p.key, p.x, p.generation) for p in rebuilt.ask(7)] == \
           [(p.key, p.x, p.generation) for p in live.ask(7)]
    # telling an outstanding (RUNNING) trial through the rebuilt study works
    k = rebuilt.outstanding[0]
    rebuilt.tell([(k, [0.1, 0.2])])
    assert k not in rebuilt.outstanding


def test_optuna_tpe_single_objective_improves():
    algo = make_algorithm("optuna_tpe", dim=3, directions=["minimize"], seed=0)
    best_start, best = math.inf, math.inf
    for i in range(12):
        props = algo.ask(5)
        vals = [float(np.sum((np.asarray(p.x) - 0.25) ** 2)) for p in props]
        algo.tell([(p.key, [v]) for p, v in zip(props, vals, strict=True)])
        if i < 2:
            best_start = min(best_start, *vals)
        best = min(best, *vals)
    assert best < best_start and best < 0.02
    told = algo.told()
    assert len(told) == 60 and all(v is not None for _, _, v in told)


def test_optuna_tpe_multi_objective_and_failures():
    algo = make_algorithm("optuna_tpe", dim=2, directions=["minimize", "maximize"], seed=1,
                          sampler_options={"n_ei_candidates": 16})
    for _ in range(10):
        props = algo.ask(4)
        algo.tell([(p.key, None if p.key == 2 else [sphere2(p.x)[0], -sphere2(p.x)[1]]) for p in props])
    trials = algo.study.get_trials(deepcopy=False)
    assert len(trials) == 40 and trials[2].state.name == "FAIL"
    assert len(algo.study.best_trials) >= 2  # a Pareto front, not a single best
    with pytest.raises(ValueError, match="unknown setting"):
        make_algorithm("optuna_tpe", dim=2, directions=["minimize"], seed=0, populaton_size=3)


def test_optuna_gp_resume_is_exact():
    """GPSampler (torch) past its startup trials, interrupted after every tell with a proposal
    outstanding; kept tiny because a GP ask costs ~0.5-5 s here (see OptunaGP.slow)."""

    def run(interrupt):
        algo = make_algorithm("optuna_gp", dim=2, directions=["minimize"], seed=0, n_startup_trials=3)
        trace, pending = [], []
        for _step in range(6):
            props = algo.ask(2)
            trace.append([(p.key, p.x) for p in props])
            pending += props
            algo.tell([(p.key, [float(np.sum((np.asarray(p.x) - 0.3) ** 2))]) for p in pending[:-1]])
            pending = pending[-1:]
            if interrupt:
                assert algo.outstanding == [pending[0].key]
                algo = roundtrip(algo)
        return trace

    assert run(False) == run(True)


def test_optuna_max_evals():
    algo = make_algorithm("optuna_tpe", dim=2, directions=["minimize"], seed=0, max_evals=5)
    assert len(algo.ask(3)) == 3 and len(algo.ask(3)) == 2 and algo.ask(3) == [] and algo.done()


# --------------------------------------------------------------------------- MAP: fitting
def test_quadratic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    T = 4
    true = rng.normal(size=len(term_names(T, "full")))
    X = rng.random((40, T))
    y = features(X, "full") @ true
    coef = fit_quadratic(X, y, "full", "identity")
    assert np.max(np.abs(coef - true)) < 1e-6
    # through the algorithm: design points, noise-free quadratic, fit error ~0
    algo = make_algorithm("map", dim=T, directions=["maximize"], seed=0, front_rounds=1)
    props = algo.ask(1000)
    assert len(props) == max(2 * len(true), 10 * T)  # the default design: 2 x terms, at least 10 x dim
    algo.tell([(p.key, [float(features(np.array(p.x), "full")[0] @ true)]) for p in props])
    algo.ask(1)  # starts the front phase: fits the surrogate
    sc = algo.surrogate_coefficients()
    assert sc["terms"] == term_names(T, "full") and sc["variant"] == "full"
    assert sc["rmse"][0] < 1e-8 and np.max(np.abs(np.array(sc["coefficients"][0]) - true)) < 1e-6


def test_sigmoid_link_fits_sigmoid_of_quadratic():
    rng = np.random.default_rng(1)
    T = 3
    true = rng.normal(scale=1.5, size=len(term_names(T, "full")))
    X = rng.random((30, T))
    acc = link_apply(features(X, "full") @ true, "sigmoid")
    coef = fit_quadratic(X, acc, "full", "sigmoid", eps=1e-9)
    assert np.max(np.abs(coef - true)) < 1e-5
    # identity would not fit it exactly; softplus round-trips too
    assert np.max(np.abs(fit_quadratic(X, acc, "full", "identity") - true)) > 1e-2
    loss = link_apply(features(X, "full") @ true, "softplus")
    assert np.max(np.abs(fit_quadratic(X, loss, "full", "softplus", eps=1e-12) - true)) < 1e-5


def test_design_contains_corners_and_isotropic_points():
    algo = make_algorithm("map", dim=3, directions=["maximize", "maximize"], seed=0)
    X = np.array([p.x for p in algo.ask(1000)])
    assert len(X) == 30  # 10 x dim (2 x terms is 20)
    assert np.allclose(X[0], 0) and all(np.allclose(X[1 + k], np.eye(3)[k]) for k in range(3))
    iso = X[4:8]
    assert np.all(np.std(iso, axis=1) < 0.15) and np.all(np.diff(iso.mean(axis=1)) > 0)
    assert np.all((X >= 0) & (X <= 1))


def test_high_dim_uses_diagonal_variant():
    algo = make_algorithm("map", dim=20, directions=["maximize"], seed=0)
    assert algo.variant == "diagonal" and algo.n_terms == 41 and len(algo.ask(1000)) == 82
    assert make_algorithm("map", dim=5, directions=["maximize"], seed=0, variant="diagonal").n_terms == 11
    with pytest.raises(ValueError, match="links"):
        make_algorithm("map", dim=2, directions=["maximize"], seed=0, links=["logit"])


# --------------------------------------------------------------------------- MAP: fronts
def two_quadratics(x, a=(0.2, 0.8, 0.3), b=(0.9, 0.1, 0.6)):
    x = np.asarray(x)
    return [float(np.sum((x - a) ** 2)), float(np.sum((x - b) ** 2))]


def igd(front, reference):
    d = np.linalg.norm(reference[:, None, :] - front[None, :, :], axis=2)
    return float(np.mean(np.min(d, axis=1)))


def test_map_predicted_front_matches_true_front():
    a, b = np.array([0.2, 0.8, 0.3]), np.array([0.9, 0.1, 0.6])
    algo = make_algorithm("map", dim=3, directions=["minimize", "minimize"], seed=0, front_rounds=1,
                          n_front=12)
    n_real = 0
    while not algo.done():
        props = algo.ask(100)
        n_real += len(props)
        algo.tell([(p.key, two_quadratics(p.x)) for p in props])
    assert n_real == 30 + 12  # the design: 10 x dim
    fit = algo.state_dict()["fits"][-1]
    pred = np.array(fit["predicted_front"])
    t = np.linspace(0, 1, 5000)[:, None]
    d2 = float(np.sum((a - b) ** 2))
    true_front = np.hstack([t**2 * d2, (1 - t) ** 2 * d2])  # the segment between a and b
    # every predicted point lies on the true front (generational distance) ...
    assert igd(true_front, pred) < 0.015
    # ... and the 12 points cover it (12 ideally spaced points on this curve give IGD ~0.037)
    assert igd(pred, true_front) < 0.06
    real = np.array([two_quadratics(x) for x in np.array([p["x"] for p in algo.state_dict()["points"][-12:]])])
    assert np.max(np.abs(real - pred)) < 1e-6  # surrogate exact: predicted = real
    assert igd(real, true_front) < 0.06


def test_bayesian_rounds_sample_the_worst_bin():
    # quadratic everywhere except a bump in the angular sector ~[68, 79] degrees (bin 6 of 8)
    def f(x):
        x = np.asarray(x)
        ang = math.degrees(math.atan2(x[1], x[0]))
        bump = 0.8 * np.linalg.norm(x) if 67.5 <= ang < 78.75 else 0.0
        return [float(x[0] ** 2 + 0.5 * x[1] + bump)]

    algo = make_algorithm("map", dim=2, directions=["maximize"], seed=0, bayesian=True, bayesian_rounds=2,
                          bayesian_points=12, temperature=0.1, front_rounds=1, n_design=24)
    assert algo.phase() == "design"
    props = algo.ask(100)
    assert len(props) == 24
    algo.tell([(p.key, f(p.x)) for p in props])
    props = algo.ask(100)
    assert algo.phase() == "adaptive" and len(props) == 12 and all(p.generation == 1 for p in props)
    info = algo.state_dict()["fits"][-1]
    worst = int(np.argmax(info["bin_scores"]))
    assert worst == 6
    bins = algo.bin_of(np.array([p.x for p in props]))
    assert np.mean(bins == worst) >= 0.5
    algo = roundtrip(algo)
    algo.tell([(p.key, f(p.x)) for p in props])
    props = algo.ask(100)  # round 2, then the front
    assert algo.phase() == "adaptive" and len(props) == 12
    algo.tell([(p.key, f(p.x)) for p in props])
    props = algo.ask(100)
    assert algo.phase() == "front" and props
    algo.tell([(p.key, f(p.x)) for p in props])
    assert algo.done() and algo.ask(5) == []


def test_map_failures_and_resume_mid_phase():
    algo = make_algorithm("map", dim=2, directions=["maximize", "minimize"], seed=3, links=["sigmoid", "softplus"])
    props = algo.ask(7)
    algo.tell([(p.key, None) for p in props[:3]])
    twin = roundtrip(algo)
    assert twin.outstanding == algo.outstanding
    assert [p.x for p in twin.ask(100)] == [p.x for p in algo.ask(100)]


# --------------------------------------------------------------------------- nested MAP
def test_nested_map_plan_on_synthetic_tasks():
    """Four models; task i's accuracy is best when model i's coefficient is ~0.6 and the others are small."""
    n = 4
    calls = []

    def acc(coefs, task):
        c = np.asarray(coefs)
        others = np.delete(c, task)
        return 1.0 / (1.0 + np.exp(-(3.0 - 8.0 * (c[task] - 0.6) ** 2 - 2.0 * np.sum(others**2))))

    def evaluate(coefs, groups):
        calls.append(list(coefs))
        return [float(np.mean([acc(coefs, t) for t in g])) for g in groups]

    plan = nested_map_pairs(n, evaluate, direction="maximize", link="sigmoid", seed=0,
                            map_settings={"n_front": 6})
    assert len(plan["steps"]) == n - 1
    assert [s["members"] for s in plan["steps"]][-1] == [0, 1, 2, 3]
    assert plan["steps"][0]["left"] == [0] and plan["steps"][0]["right"] == [1]
    assert plan["steps"][1]["left"] == [2] and plan["steps"][1]["right"] == [3]
    assert plan["evaluations"] == len(calls) == sum(s["evaluations"] for s in plan["steps"])
    final = np.array(plan["coefficients"])
    assert final.shape == (n,) and np.all(final > 0.05)
    assert np.allclose(final, plan["steps"][-1]["coefficients"])
    # the chosen merge beats the naive average in mean accuracy over all tasks
    mean_acc = float(np.mean(evaluate(list(final), [[t] for t in range(n)])))
    naive = float(np.mean(evaluate([0.25] * n, [[t] for t in range(n)])))
    assert mean_acc > naive
    assert plan["steps"][0]["surrogate"]["links"] == ["sigmoid", "sigmoid"]


def test_map_is_registered():
    assert isinstance(make_algorithm("map", dim=2, directions=["maximize"], seed=0), MAP)


def test_optuna_gp_improves_on_its_startup_points():
    """The GP phase beats the random start-up points on a 1-D quadratic (small: a GP ask costs seconds)."""
    algo = make_algorithm("optuna_gp", dim=1, directions=["minimize"], seed=0, n_startup_trials=5)
    # Failed trials (None, NaN) among the start-up points must not break the GP phase.
    for bad in (None, [float("nan")]):
        (p,) = algo.ask(1)
        algo.tell([(p.key, bad)])
    values = []
    for _ in range(9):
        (p,) = algo.ask(1)
        v = (p.x[0] - 0.3) ** 2
        algo.tell([(p.key, [v])])
        values.append(v)
    assert min(values[5:]) < min(values[:5])
    assert min(values[5:]) < 1e-3


def test_kriging_residual_learns_what_the_quadratic_misses_and_resumes():
    # a quadratic plus a narrow ridge along x0 + x1 = 1 (what the zoo v2 demo's cross objective has)
    def f(x):
        x = np.asarray(x)
        return [float(x[0] - x[1] ** 2 + 1.5 * np.exp(-(((x[0] + x[1] - 1.0) / 0.15) ** 2)))]

    def run(**settings):
        algo = make_algorithm("map", dim=2, directions=["maximize"], seed=0, front_rounds=1, **settings)
        props = algo.ask(1000)
        algo.tell([(p.key, f(p.x)) for p in props])
        algo.ask(1)  # fits
        return algo

    gp, quad = run(), run(residual=None, n_design=20)  # the same design
    assert gp.n_design == 20 and run(residual=None).n_design == 12  # 10 x dim with the residual, else 2 x terms
    fit = gp.state_dict()["fits"][-1]
    assert fit["residuals"][0] is not None and len(fit["x"]) == 20
    assert "residuals" not in quad.state_dict()["fits"][-1]
    X = np.random.default_rng(0).random((400, 2))
    truth = np.array([f(x)[0] for x in X])
    err_gp = np.sqrt(np.mean((gp.predict(X)[:, 0] - truth) ** 2))
    err_quad = np.sqrt(np.mean((quad.predict(X)[:, 0] - truth) ** 2))
    assert err_gp < 0.8 * err_quad  # measured: 0.35 against 0.48
    twin = roundtrip(gp)
    assert np.allclose(twin.predict(X), gp.predict(X))
    assert [p.x for p in twin.ask(100)] == [p.x for p in gp.ask(100)]
