"""MAP on synthetic ridge landscapes: its real front's hypervolume against a 16 x 16 grid's.

    python bench/map_ridge.py [--landscapes 32] [--seeds 5] [--set KEY=VALUE ...]

A stand-in for the demo zoo that needs no models: each landscape is a 2-D genome (x in [0, 1]^2) with
three maximized accuracies -- "arith" and "script", smooth sigmoids of quadratics, and "cross", a
narrow bent ridge of random position, width and height on a low floor (the structure a quadratic
surrogate misses) -- each rounded to 200 examples. Landscape ``i`` is drawn from
``numpy.random.default_rng(i)``. On each landscape and seed MAP runs with dim 2, sigmoid links and
three front rounds (``--set`` changes its settings, e.g. ``residual=null``, ``acquisition=spread``,
``optimism=0.5``, ``n_design=12``; values are parsed as JSON, else kept as strings; MAP before its
kriging residual: ``residual=null acquisition=spread design_tries=1``, whose design is then the old
2 x terms = 12 points with a single Latin hypercube); the grid
evaluates every point of a 16 x 16 lattice. Both are measured by the hypervolume of every point they
evaluated (fixed accuracy reference point). Prints one line per landscape (grid hypervolume, MAP's
ratio per seed in %, MAP's evaluations) and last ``RESULT <json>``: ``below_95`` counts the runs under
95% of the grid's hypervolume; ``min`` and ``mean`` are ratios over all runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from evomerge import front as frontlib
from evomerge.search import make_algorithm

DIRECTIONS = ["maximize"] * 3
# bench/_harness.py's accuracy_reference, computed here: importing _harness loads the worker stack
REFERENCE = frontlib.reference_point_from_bounds([(0.0, 1.0)] * 3, DIRECTIONS)
EXAMPLES = 200
GRID = 16


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + np.exp(-z))


def landscape(inst: int) -> Callable[[list[float]], list[float]]:
    """Landscape ``inst``: x -> [arith, script, cross], each a multiple of 1 / EXAMPLES."""
    # The draws' order is part of the benchmark: reordering them changes every landscape.
    r = np.random.default_rng(inst)
    c0 = r.uniform(0.55, 0.95)  # ridge position
    w = r.uniform(0.04, 0.09)  # ridge width
    bend = r.uniform(-0.6, 0.6)  # ridge curvature
    h = r.uniform(0.3, 0.6)  # ridge height
    a = r.uniform(0.3, 0.7)  # ridge direction mix
    p2 = r.uniform(0.4, 0.65)  # script's best x2

    def quantize(v: float) -> float:
        return round(v * EXAMPLES) / EXAMPLES

    def f(x: list[float]) -> list[float]:
        x1, x2 = float(x[0]), float(x[1])
        arith = _sigmoid(4.5 - 4 * x2**2 - 3 * x1 * x2 - 1.5 * x1**2 * x2)
        script = _sigmoid(1.8 - 10 * (x2 - p2) ** 2 - 2.5 * x1 - 1.0 + 1.5 * x2 * (1 - x1))
        s = a * x1 + (1 - a) * x2 + bend * (x1 - x2) ** 2
        cross = 0.02 + h * np.exp(-(((s - c0 * 0.7) / w) ** 2)) * (0.5 + 0.5 * x2)
        return [quantize(arith), quantize(script), quantize(cross)]

    return f


def hypervolume(values: list[list[float]]) -> float:
    return frontlib.hypervolume(frontlib.to_minimization(values, DIRECTIONS), REFERENCE)


def grid_hypervolume(f: Callable[[list[float]], list[float]], g: int = GRID) -> float:
    axis = np.linspace(0.0, 1.0, g)
    return hypervolume([f([a, b]) for a in axis for b in axis])


def make_map(seed: int, settings: dict[str, Any]):
    return make_algorithm("map", dim=2, directions=DIRECTIONS, seed=seed, links=["sigmoid"] * 3,
                          **{"front_rounds": 3, **settings})


def run_map(f: Callable[[list[float]], list[float]], seed: int, settings: dict[str, Any]) -> list[list[float]]:
    """Every value MAP evaluated, driven like bench/map_surrogate.py (batches of 64 asks)."""
    algo = make_map(seed, settings)
    values: list[list[float]] = []
    while not algo.done():
        props = algo.ask(64)
        if not props:
            break
        results = [(p.key, f(p.x)) for p in props]
        values += [v for _, v in results]
        algo.tell(results)
    return values


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--landscapes", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a MAP setting (value as JSON, else a string); repeatable")
    args = ap.parse_args()
    settings = parse_set(args.set)
    try:  # a bad setting is a one-line error before any run, not a traceback after the first grid
        make_map(0, settings)
    except (TypeError, ValueError) as e:
        ap.error(f"--set: {e}")

    ratios: list[float] = []
    evals: set[int] = set()
    for inst in range(args.landscapes):
        f = landscape(inst)
        g = grid_hypervolume(f)
        row = []
        for seed in range(args.seeds):
            values = run_map(f, seed, settings)
            evals.add(len(values))
            row.append(hypervolume(values) / g)
        ratios += row
        print(f"landscape {inst:>3} grid HV {g:.4f}  MAP % " + " ".join(f"{100 * r:5.1f}" for r in row)
              + f"  evals {len(values)}", flush=True)
    result = {
        "landscapes": args.landscapes,
        "seeds": args.seeds,
        "settings": settings,
        "evals": sorted(evals)[0] if len(evals) == 1 else sorted(evals),
        "grid_evals": GRID * GRID,
        "below_95": sum(r < 0.95 for r in ratios),
        "runs": len(ratios),
        "min": round(min(ratios), 4),
        "mean": round(float(np.mean(ratios)), 4),
    }
    print(f"MAP: {result['below_95']}/{result['runs']} runs under 95% of the grid's hypervolume, worst "
          f"{100 * result['min']:.1f}%, mean {100 * result['mean']:.1f}%")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
