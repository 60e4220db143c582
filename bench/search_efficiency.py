"""Search efficiency on the demo zoo: hypervolume against number of evaluations for every algorithm.

    python bench/search_efficiency.py [--quick] [--budget 60] [--seeds 3] [--plot docs/search_efficiency.png]

Every registered evomerge algorithm runs on search_spaces/demo.yaml's genome and objectives with equal
budgets and several seeds; `pymoo_nsga2` is evomerge's `nsga2` (it is pymoo's NSGA-II), reported under
both names. Hypervolume uses the fixed accuracy reference point (both objectives in [0, 1]).
`--quick` scores each objective on 50 examples instead of 200. Prints a table and last `RESULT <json>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _harness import Evaluations, accuracy_reference, demo_space, hv_curve, run_algorithm

from evomerge.search import REGISTRY

# Settings that size each algorithm to a budget of a few dozen evaluations.
SETTINGS = {
    "nsga2": {"pop_size": 12},
    "optuna_nsga2": {"population_size": 12},
    "m2n2": {"pop": 12},
    "map": {"front_rounds": None},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="50 examples per objective, 2 seeds, budget 40")
    ap.add_argument("--algorithms", nargs="*", default=None)
    ap.add_argument("--plot", type=Path, default=None, help="write hypervolume curves to this PNG")
    ap.add_argument("--multi-fidelity", type=float, default=None, metavar="FRACTION",
                    help="also run nsga2 with multi-fidelity evaluation (first slice = FRACTION)")
    args = ap.parse_args()
    budget, seeds, limit = (40, 2, 50) if args.quick else (args.budget, args.seeds, None)
    names = args.algorithms or sorted(REGISTRY)
    with tempfile.TemporaryDirectory() as d:
        space = demo_space(Path(d), limit=limit)
        ev = Evaluations(space)
    directions = [o.direction for o in space.objectives]
    ref = accuracy_reference(len(directions), directions)
    curves: dict[str, list[list[float]]] = {}
    t0 = time.perf_counter()
    for name in names:
        for seed in range(seeds):
            vals = run_algorithm(ev, name, budget, seed, **SETTINGS.get(name, {}))
            curves.setdefault(name, []).append(hv_curve(vals, directions, ref))
            print(f"{name:>13} seed {seed}: {len(vals)} evals, HV {curves[name][-1][-1]:.4f}", file=sys.stderr)
    mf = None
    if args.multi_fidelity:
        fid = {"fraction": args.multi_fidelity, "bound": "hoeffding", "delta": 0.05}
        finals, shares = [], []
        for seed in range(seeds):
            ev.fidelity = []
            vals = run_algorithm(ev, "nsga2", budget, seed, fidelity=fid, **SETTINGS["nsga2"])
            finals.append(hv_curve(vals, directions, ref)[-1])
            shares.append(sum(ev.fidelity) / len(ev.fidelity))
        mf = {"algorithm": "nsga2", **fid,
              "hv": {"mean": round(statistics.mean(finals), 4),
                     "std": round(statistics.stdev(finals), 4) if len(finals) > 1 else 0.0},
              "examples_scored": round(statistics.mean(shares), 4)}
        print(f"nsga2 multi-fidelity: HV {mf['hv']['mean']:.4f} with {100 * mf['examples_scored']:.0f}% of the "
              "examples scored", file=sys.stderr)
    hv = {}
    for name, cs in curves.items():
        finals = [c[-1] for c in cs]
        hv[name] = {"mean": round(statistics.mean(finals), 4),
                    "std": round(statistics.stdev(finals), 4) if len(finals) > 1 else 0.0}
    if "nsga2" in hv:
        hv["pymoo_nsga2"] = hv["nsga2"]
    print(f"\n{'algorithm':>13}  HV mean   HV std   (budget {budget}, {seeds} seeds)")
    for name, h in sorted(hv.items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{name:>13}  {h['mean']:.4f}   {h['std']:.4f}")
    print(f"evaluations run: {ev.calls} ({ev.seconds:.0f}s), cached repeats free; wall {time.perf_counter() - t0:.0f}s")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, cs in sorted(curves.items()):
            n = min(len(c) for c in cs)
            mean = [statistics.mean(c[i] for c in cs) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=name)
        ax.set_xlabel("evaluations")
        ax.set_ylabel(f"hypervolume (mean of {seeds} seeds)")
        ax.set_title("Demo zoo: hypervolume against evaluations")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    result = {"budget": budget, "seeds": seeds, "limit": limit, "hv": hv}
    if mf is not None:
        result["multi_fidelity"] = mf
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
