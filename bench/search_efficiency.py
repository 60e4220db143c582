"""Search efficiency on the demo zoo: hypervolume against number of evaluations for every algorithm.

    python bench/search_efficiency.py [--quick] [--budget 60] [--seeds 5] [--first-seed 0] [--jobs 2]
        [--plot docs/search_efficiency.png]
        [--fidelity racing|anchors [--fidelity-fraction 0.25] [--fidelity-z Z] [--fidelity-gain G]
         [--fidelity-confirm F [--fidelity-confirm-z Z] [--fidelity-confirm-steps N]]
         [--fidelity-budget N] [--fidelity-algorithm nsga2]]

Every registered evomerge algorithm runs on search_spaces/demo.yaml's genome and objectives with equal
budgets and several seeds (at least 5: a rank test on fewer cannot reach p < 0.05); `pymoo_nsga2` is
evomerge's `nsga2` (it is pymoo's NSGA-II), reported under both names, as `pymoo_nsga3` is `nsga3`.
Hypervolume uses the fixed accuracy reference point (every objective in [0, 1]). For every pair of
algorithms a two-sided Mann-Whitney U test on the final hypervolumes of the seeds (scipy; the seeds of
two algorithms are independent runs, not paired) says whether they differ; the best of evomerge's own
algorithms (everything but Optuna's samplers, pymoo's NSGA-II/III and random) is set against Optuna's
best and pymoo's best. `--quick` scores each objective on 50 examples instead of 200, budget 40.
`--fidelity` also runs one algorithm (`--fidelity-algorithm`, default nsga2) with cheaper fitness
(`racing`: multi-fidelity racing on a first slice; `anchors`: anchor-subset estimation) and reports the
share of examples scored and its final hypervolume (the front fully scored) over the same algorithm's
without it. `--fidelity-budget N` gives the cheaper
search N candidates instead of the budget (a user who pays per example scored can afford more of them):
`examples_scored_fraction` is then its examples over the full search's, `examples_per_candidate` its share
of each candidate's examples. `--jobs N` runs the (algorithm, seed) runs
in N processes, each with its own resident worker (the same results: evaluation is deterministic). Prints
a table and last `RESULT <json>`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from _harness import Evaluations, accuracy_reference, demo_space, hv_curve, run_algorithm
from scipy.stats import mannwhitneyu

from evomerge.fidelity import MultiFidelity
from evomerge.search import REGISTRY

# pymoo's algorithms as pymoo ships them (evomerge only wraps them in ask/tell) and Optuna's samplers.
PYMOO = {"nsga2", "nsga3"}
BASELINES = {"random"}

# Settings that size each algorithm to a budget of a few dozen evaluations.
SETTINGS = {
    "nsga2": {"pop_size": 12},
    "optuna_nsga2": {"population_size": 12},
    "nsga3": {"pop_size": 12, "n_partitions": None},  # fitted to the objectives by _partitions
    "m2n2": {"pop": 12},
    "map": {"front_rounds": None},
}


def summary(finals: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(finals), 4),
            "std": round(statistics.stdev(finals), 4) if len(finals) > 1 else 0.0}


def rank_test(a: list[float], b: list[float]) -> dict[str, float | None]:
    """Two-sided Mann-Whitney U on two algorithms' final hypervolumes (independent seeds)."""
    if len(a) < 2 or len(b) < 2 or len(set(a) | set(b)) == 1:
        return {"u": None, "p": 1.0}  # no spread at all: nothing to rank
    res = mannwhitneyu(a, b, alternative="two-sided")
    return {"u": float(res.statistic), "p": round(float(res.pvalue), 4)}


def family(name: str) -> str:
    if name.startswith("optuna_"):
        return "optuna"
    if name in PYMOO:
        return "pymoo"
    return "baseline" if name in BASELINES else "evomerge"


def _partitions(n_obj: int, pop: int) -> int:
    """The most Das-Dennis partitions whose reference directions, C(p + n_obj - 1, n_obj - 1), fit in the
    population: more directions than individuals leave some unserved (pymoo warns)."""
    p = 1
    while math.comb(p + n_obj, n_obj - 1) <= pop:
        p += 1
    return p


_EV: Evaluations | None = None  # this process's resident worker and score cache


def _start(limit: int | None, threads: int | None) -> None:
    global _EV
    if threads:  # one process per core: torch's own threads would fight over the cores
        import torch

        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        _EV = Evaluations(demo_space(Path(d), limit=limit))


def _run(name: str, seed: int, budget: int, fidelity: dict | None) -> dict:
    """One search: its hypervolume curve and, with ``fidelity`` ({"mode", ...settings}), the share of the
    examples it scored and the anchor estimates' errors."""
    ev = _EV
    ev.fidelity, ev.estimate_errors = [], []
    calls, seconds = ev.calls, ev.seconds
    settings = dict(SETTINGS.get(name, {}))
    if "n_partitions" in settings:  # NSGA-III's reference directions fitted to the objectives and population
        settings["n_partitions"] = _partitions(len(ev.space.objectives), settings["pop_size"])
    if fidelity is None:
        vals = run_algorithm(ev, name, budget, seed, **settings)
    elif fidelity["mode"] == "racing":
        fid = {k: v for k, v in fidelity.items() if k != "mode"}
        vals = run_algorithm(ev, name, budget, seed, fidelity=fid, **settings)
    else:
        vals = run_algorithm(ev, name, budget, seed, anchors={k: v for k, v in fidelity.items() if k != "mode"},
                             **settings)
    directions = [o.direction for o in ev.space.objectives]
    return {"curve": hv_curve(vals, directions, accuracy_reference(len(directions), directions)),
            "evals": len(vals), "share": sum(ev.fidelity) / len(ev.fidelity) if ev.fidelity else 1.0,
            "examples": sum(ev.fidelity) if ev.fidelity else float(len(vals)),  # in candidates' worth
            "errors": list(ev.estimate_errors), "calls": ev.calls - calls, "seconds": ev.seconds - seconds}


def _run_all(jobs: list[tuple], n: int, limit: int | None) -> list[dict]:
    if n <= 1:
        _start(limit, None)
        return [_run(*j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch or thread state
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_start, initargs=(limit, 1)) as pool:
        futures = {pool.submit(_run, *j): i for i, j in enumerate(jobs)}
        out: list[dict] = [{}] * len(jobs)
        for done, f in enumerate(as_completed(futures), 1):  # a line per finished search: runs take minutes
            i = futures[f]
            out[i] = f.result()
            print(f"[{done}/{len(jobs)}] {jobs[i][0]} seed {jobs[i][1]} done", file=sys.stderr, flush=True)
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="run seeds first-seed .. first-seed + seeds - 1 (to add seeds to an earlier run)")
    ap.add_argument("--quick", action="store_true", help="50 examples per objective, budget 40")
    ap.add_argument("--limit", type=int, default=None, help="score each objective on this many examples")
    ap.add_argument("--algorithms", nargs="*", default=None)
    ap.add_argument("--plot", type=Path, default=None, help="write hypervolume curves to this PNG")
    ap.add_argument("--fidelity", choices=["racing", "anchors"], default=None,
                    help="also run --fidelity-algorithm with cheaper fitness and compare it with its full scoring")
    ap.add_argument("--fidelity-algorithm", default="nsga2", help="the algorithm searched with cheaper fitness")
    ap.add_argument("--fidelity-fraction", type=float, default=0.25,
                    help="racing: the first slice; anchors: the share of examples in the anchor subset")
    ap.add_argument("--multi-fidelity", type=float, default=None, metavar="FRACTION",
                    help="the same as --fidelity racing --fidelity-fraction FRACTION (kept for older commands)")
    ap.add_argument("--fidelity-z", type=float, default=None, help="anchors: error bars of optimism (default 2)")
    ap.add_argument("--min-reference", type=int, default=None, help="anchors: fully scored candidates first")
    ap.add_argument("--fidelity-gain", type=float, default=None,
                    help="finish only candidates whose optimistic scores add this share of the front's hypervolume")
    ap.add_argument("--fidelity-confirm", type=float, default=None,
                    help="anchors: score candidates passing the first gate on this larger share before finishing")
    ap.add_argument("--fidelity-confirm-z", type=float, default=None, help="anchors: the second gate's error bars")
    ap.add_argument("--fidelity-confirm-steps", type=int, default=None,
                    help="anchors: reach the confirm subset in this many gated steps")
    ap.add_argument("--fidelity-budget", type=int, default=None,
                    help="candidates of the cheaper search (default: --budget), to compare at equal examples scored")
    ap.add_argument("--jobs", type=int, default=1, help="processes running searches side by side")
    args = ap.parse_args()
    if args.multi_fidelity is not None:
        args.fidelity, args.fidelity_fraction = "racing", args.multi_fidelity
    budget, limit = (40, 50) if args.quick else (args.budget, args.limit)
    seeds = args.seeds
    names = args.algorithms or sorted(REGISTRY)
    for name in [*names, args.fidelity_algorithm]:
        if name not in REGISTRY:
            ap.error(f"unknown algorithm {name!r} (known: {', '.join(sorted(REGISTRY))})")
    cheap = args.fidelity_algorithm
    if args.fidelity and cheap not in names:
        names = [*names, cheap]  # the full-evaluation search the cheaper one is compared with
    fid = None
    if args.fidelity == "racing":
        fid = {"mode": "racing", "fraction": args.fidelity_fraction, "bound": "hoeffding", "delta": 0.05}
    elif args.fidelity == "anchors":
        fid = {"mode": "anchors", "fraction": args.fidelity_fraction}
        for key, value in (("z", args.fidelity_z), ("min_reference", args.min_reference),
                           ("confirm", args.fidelity_confirm), ("confirm_z", args.fidelity_confirm_z),
                           ("confirm_steps", args.fidelity_confirm_steps)):
            if value is not None:
                fid[key] = value
    if fid is not None and args.fidelity_gain is not None:
        fid["min_gain"] = args.fidelity_gain
    if fid is not None:  # checked here, in one line, not as a traceback from each search process
        try:
            MultiFidelity(**{k: v for k, v in fid.items() if k != "mode"}, method=fid["mode"])
        except ValueError as e:
            ap.error(f"--fidelity settings: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}")
    seed_list = range(args.first_seed, args.first_seed + seeds)
    jobs = [(name, seed, budget, None) for name in names for seed in seed_list]
    if fid is not None:
        jobs += [(cheap, seed, args.fidelity_budget or budget, fid) for seed in seed_list]
    t0 = time.perf_counter()
    runs = _run_all(jobs, args.jobs, limit)
    curves: dict[str, list[list[float]]] = {}
    fid_runs = []
    full_examples: dict[int, float] = {}  # per seed: the examples the full-evaluation search scored
    for (name, seed, _, f), r in zip(jobs, runs, strict=True):
        if f is None:
            curves.setdefault(name, []).append(r["curve"])
            if name == cheap:
                full_examples[seed] = r["examples"]
            print(f"{name:>13} seed {seed}: {r['evals']} evals, HV {r['curve'][-1]:.4f}", file=sys.stderr)
        else:
            fid_runs.append((seed, r))
            print(f"{cheap + '+' + args.fidelity:>13} seed {seed}: {r['evals']} evals, HV {r['curve'][-1]:.4f}, "
                  f"{100 * r['share']:.0f}% of the examples", file=sys.stderr)
    calls, seconds = sum(r["calls"] for r in runs), sum(r["seconds"] for r in runs)
    finals = {name: [c[-1] for c in cs] for name, cs in curves.items()}
    hv = {name: summary(f) for name, f in finals.items()}
    result: dict = {"budget": budget, "seeds": seeds, "first_seed": args.first_seed, "limit": limit, "hv": hv}
    if fid is not None:
        fid_finals = [r["curve"][-1] for _, r in fid_runs]
        # the cost against the full search of the same seed: equal to the per-candidate share at equal budgets
        shares = [r["examples"] / full_examples[seed] for seed, r in fid_runs]
        per_candidate = [r["share"] for _, r in fid_runs]
        errors = [e for _, r in fid_runs for e in r["errors"]]
        mf = {"algorithm": cheap, "mode": args.fidelity, "fraction": args.fidelity_fraction, "z": args.fidelity_z,
              "min_reference": args.min_reference, "min_gain": args.fidelity_gain, "confirm": args.fidelity_confirm,
              "confirm_z": args.fidelity_confirm_z, "confirm_steps": args.fidelity_confirm_steps,
              "hv": summary(fid_finals),
              "hv_per_seed": [round(v, 4) for v in fid_finals],
              "full_hv_per_seed": [round(v, 4) for v in finals[cheap]],
              "examples_scored": round(statistics.mean(shares), 4),
              "examples_scored_per_seed": [round(v, 4) for v in shares],
              "candidates": args.fidelity_budget or budget,
              "examples_per_candidate": round(statistics.mean(per_candidate), 4),
              "vs_full": rank_test(fid_finals, finals[cheap])}
        if errors:
            mf["estimate_abs_error"] = {"mean": round(statistics.mean(errors), 4), "max": round(max(errors), 4),
                                        "n": len(errors)}
        result["multi_fidelity"] = mf
        result["examples_scored_fraction"] = mf["examples_scored"]
        result["hv_ratio_to_full"] = round(statistics.mean(fid_finals) / statistics.mean(finals[cheap]), 4)
        print(f"{cheap} with {args.fidelity}: HV {mf['hv']['mean']:.4f} ({result['hv_ratio_to_full']:.3f} of full) "
              f"with {100 * mf['examples_scored']:.0f}% of the examples scored ({mf['candidates']} candidates, "
              f"{100 * mf['examples_per_candidate']:.0f}% of each one's examples); against the full search "
              f"Mann-Whitney U p = {mf['vs_full']['p']:.3f}", file=sys.stderr)
    if "nsga2" in hv:
        hv["pymoo_nsga2"] = hv["nsga2"]
    if "nsga3" in hv:
        hv["pymoo_nsga3"] = hv["nsga3"]
    ran = sorted(finals, key=lambda n: -statistics.mean(finals[n]))
    tests = {f"{a} vs {b}": rank_test(finals[a], finals[b]) for i, a in enumerate(ran) for b in ran[i + 1:]}
    best = {}
    for fam in ("evomerge", "optuna", "pymoo"):
        members = [n for n in ran if family(n) == fam]
        if members:
            best[fam] = members[0]
    versus = {}
    if "evomerge" in best:
        for fam in ("optuna", "pymoo"):
            if fam in best:
                a, b = best["evomerge"], best[fam]
                versus[fam] = {"evomerge": a, fam: b, "hv_diff": round(statistics.mean(finals[a])
                                                                         - statistics.mean(finals[b]), 4),
                               **rank_test(finals[a], finals[b])}
    result.update({"tests": tests, "best": best, "evomerge_vs": versus})
    print(f"\n{'algorithm':>13}  HV mean   HV std   (budget {budget}, {seeds} seeds)")
    for name in ran:
        print(f"{name:>13}  {hv[name]['mean']:.4f}   {hv[name]['std']:.4f}   {family(name)}")
    for fam, v in versus.items():
        print(f"evomerge's best {v['evomerge']} vs {fam}'s best {v[fam]}: HV difference {v['hv_diff']:+.4f}, "
              f"Mann-Whitney U p = {v['p']:.3f}")
    for pair, t in tests.items():
        if t["p"] < 0.05:
            print(f"  differ (p < 0.05): {pair} (p = {t['p']:.3f})")
    print(f"evaluations run: {calls} ({seconds:.0f}s), cached repeats free; wall {time.perf_counter() - t0:.0f}s")
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
    print("RESULT " + json.dumps(result, allow_nan=False))


if __name__ == "__main__":
    main()
