"""MAP on the demo zoo: the amortized (surrogate) front against a dense grid-search front.

    python bench/map_surrogate.py [--grid 16] [--front-rounds 3] [--quick]

Genome: task arithmetic over the demo zoo's two experts with one coefficient per model (MAP's setting,
c in [0, 1.5]^2). MAP fits a quadratic per objective (sigmoid link, accuracies) on its design points,
runs NSGA-II on the surrogates and evaluates the predicted front for real, then refits on everything it
evaluated and does so again (``--front-rounds``). The grid evaluates every point
of a grid x grid lattice. Both fronts are measured with real evaluations: hypervolume of each (fixed
accuracy reference point) and IGD of MAP's real front to the grid's front. `--quick`: 50 examples per
objective and a 10 x 10 grid. Prints a table and last `RESULT <json>`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import Evaluations, accuracy_reference, demo_space

from evomerge import front as frontlib
from evomerge.search import make_algorithm


def igd(approx: np.ndarray, reference: np.ndarray) -> float:
    """Mean distance from each reference-front point to its nearest approximating point (min form)."""
    d = np.linalg.norm(reference[:, None, :] - approx[None, :, :], axis=2)
    return float(d.min(axis=1).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--front-rounds", type=int, default=3,
                    help="MAP's refits on its own front points (each hands out n_front more points)")
    args = ap.parse_args()
    grid, limit = (10, 50) if args.quick else (args.grid, None)
    edits = {r"^  method: .*$": "  method: task_arithmetic", r"^  layer_groups: .*$": "  layer_groups: model",
             r"^  density_bounds: .*$": ""}
    with tempfile.TemporaryDirectory() as d:
        space = demo_space(Path(d), limit=limit, edits=edits)
        ev = Evaluations(space)
    assert ev.genome.dim == 2, ev.genome.gene_names()
    directions = [o.direction for o in space.objectives]
    ref = accuracy_reference(len(directions), directions)

    t0 = time.perf_counter()
    algo = make_algorithm("map", dim=2, directions=directions, seed=args.seed, links=["sigmoid"] * len(directions),
                          front_rounds=args.front_rounds)
    map_points: list[tuple[int, list[float], list[float] | None]] = []
    front_keys: set[int] = set()
    while not algo.done():
        props = algo.ask(64)
        if not props:
            break
        phase = algo.phase()
        results = []
        for p in props:
            values, _ = ev.score(p.x)
            results.append((p.key, values))
            map_points.append((p.key, p.x, values))
            if phase == "front":
                front_keys.add(p.key)
        algo.tell(results)
    evals_map = len(map_points)
    map_s = time.perf_counter() - t0
    fit = algo.surrogate_coefficients()
    predicted = [v for k, _, v in map_points if k in front_keys]

    t0 = time.perf_counter()
    axis = np.linspace(0.0, 1.0, grid)
    grid_vals = [ev.score([a, b])[0] for a in axis for b in axis]
    grid_s = time.perf_counter() - t0

    Fg = frontlib.to_minimization(grid_vals, directions)
    Fm = frontlib.to_minimization([v for v in predicted if v is not None], directions)
    Fall = frontlib.to_minimization([v for _, _, v in map_points if v is not None], directions)
    grid_front = Fg[frontlib.non_dominated(Fg)]
    map_front = Fm[frontlib.non_dominated(Fm)] if len(Fm) else Fm
    result = {
        "igd": round(igd(map_front, grid_front), 4) if len(map_front) else None,
        "hv_surrogate_front": round(frontlib.hypervolume(Fm, ref), 4),
        "hv_all_map_points": round(frontlib.hypervolume(Fall, ref), 4),
        "hv_grid_front": round(frontlib.hypervolume(Fg, ref), 4),
        "evals_map": evals_map,
        "evals_grid": grid * grid,
        "evals_share": round(evals_map / (grid * grid), 4),
        # what a user of MAP gets: the front of every point it evaluated, against the dense grid's
        "hv_ratio": round(frontlib.hypervolume(Fall, ref) / frontlib.hypervolume(Fg, ref), 4),
        "limit": limit,
        "surrogate_rmse": fit.get("rmse"),
    }
    print(f"{'':>22} {'evals':>6} {'HV':>7}  seconds")
    print(f"{'MAP predicted front':>22} {evals_map:>6} {result['hv_surrogate_front']:>7}  {map_s:.0f}")
    print(f"{'grid search':>22} {grid * grid:>6} {result['hv_grid_front']:>7}  {grid_s:.0f}")
    print(f"IGD(MAP front -> grid front) = {result['igd']}; surrogate RMSE {fit.get('rmse')}")
    print(f"MAP: {100 * result['hv_ratio']:.1f}% of the grid's hypervolume with {100 * result['evals_share']:.0f}% "
          "of its evaluations")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
