"""A simulated cluster: how busy each algorithm keeps the workers, what the driver itself costs per
candidate, and what steady-state NSGA-II gives up (or not) against the generational one.

No models. Evaluation times are heavy-tailed (lognormal, sigma 1: the slowest of 512 takes ~20x the
median) and divided by each worker's speed (log-uniform in 0.5x-2x); time is a virtual clock.

1. idle: per algorithm and pool size (64, 512 workers), the algorithm's ask/tell on a virtual clock;
   idle = share of worker time with no task while budget was left to hand out (the tail after the last
   proposal is not the algorithm's doing). A cheap synthetic problem (ZDT1 written as two accuracies).
2. hv: hypervolume at equal evaluations, each generational algorithm against its asynchronous
   variant (NSGA-II and NSGA-III against steady-state, MAP and nested MAP against map_async and
   map_nested_async), several seeds. CMA-ES (one objective, the sum of the two) against its
   asking-ahead variant: the best sum found.
3. driver: the real study loop (`StudyRun`, the store, decoding, checkpoints) over a simulated pool
   answering at once, SQLite and PostgreSQL, 64 and 512 workers (NSGA-II's populations one per
   worker): the driver's own seconds per candidate (wall time / candidates: the pool costs nothing),
   and its SQL round trips and commits per candidate. `--profile` prints the top calls.

    python bench/cluster_sim.py [--quick] [--profile]      ends with RESULT {json}
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import io
import itertools
import json
import os
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import event
from sqlalchemy.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from evomerge import front as frontlib  # noqa: E402
from evomerge.run.pool import Outcome, Task, WorkerPool  # noqa: E402
from evomerge.search import GenomeLayout, SearchContext, make_algorithm  # noqa: E402
from evomerge.search.base import REGISTRY  # noqa: E402

N_EXAMPLES = 16
DIM = 8  # 4 layer groups x 2 sources


# ------------------------------------------------------------------ the synthetic problem
def zdt1_accuracies(x: np.ndarray) -> list[float]:
    """ZDT1 as two values in [0, 1] to maximise (its Pareto front: a1 = 1 - f1, a2 = exp(-f2))."""
    f1 = float(x[0])
    g = 1.0 + 9.0 * float(np.mean(x[1:]))
    f2 = g * (1.0 - np.sqrt(f1 / g))
    return [1.0 - f1, float(np.exp(-f2))]


def samples_of(values: list[float]) -> list[float]:
    """Per-example 0/1 scores whose mean is the value (to N_EXAMPLES resolution), objective by objective."""
    out: list[float] = []
    for v in values:
        k = int(round(v * N_EXAMPLES))
        out += [1.0] * k + [0.0] * (N_EXAMPLES - k)
    return out


def build(name: str, seed: int, workers: int):
    """``name`` as a user of ``workers`` workers would set it up: populations of at least one per worker
    (a smaller one leaves workers idle in the generational versions by construction, and feeds the
    asynchronous ones samples of distributions many generations old)."""
    cls = REGISTRY[name]
    ctx = SearchContext(bounded=(True, True), layout=GenomeLayout(n_sources=2, genes_per_source=1))
    settings = cls.derive_settings({}, ctx)
    if name in ("nsga2", "nsga2_steady", "nsga3", "nsga3_steady"):
        settings["pop_size"] = max(32, workers)
    if name in ("cmaes", "cmaes_async"):
        settings["popsize"] = max(10, workers)
    weights = None if cls.multi_objective else [1.0, 1.0]
    return make_algorithm(name, dim=DIM, directions=["maximize", "maximize"], seed=seed, weights=weights,
                          **settings)


# ------------------------------------------------------------------ 1 and 2: the virtual cluster
def simulate(name: str, workers: int, budget: int, seed: int) -> dict:
    """Run ``name`` on a virtual cluster; returns idle share, makespan and the values in evaluation order."""
    rng = np.random.default_rng([seed, workers])
    speeds = np.exp(rng.uniform(np.log(0.5), np.log(2.0), workers))
    algo = build(name, seed, workers)
    needs_samples = algo.needs_samples
    now, idle_time, busy_until_budget = 0.0, 0.0, None
    free = list(range(workers))
    idle_since = dict.fromkeys(free, 0.0)
    events: list[tuple[float, int, int, list[float]]] = []  # (finish, worker, key, values)
    handed, told = 0, 0
    values_in_order: list[list[float]] = []
    xs: dict[int, np.ndarray] = {}
    while told < budget:
        if handed < budget and free:
            props = algo.ask(min(len(free), budget - handed))
            for p in props:
                w = free.pop()
                idle_time += now - idle_since.pop(w)
                xs[p.key] = np.asarray(p.x)
                dur = float(rng.lognormal(0.0, 1.0)) / speeds[w]
                heapq.heappush(events, (now + dur, w, p.key, zdt1_accuracies(np.asarray(p.x))))
                handed += 1
            if handed >= budget and busy_until_budget is None:
                busy_until_budget = now
        if not events:
            break  # the algorithm has nothing to propose and nothing is in flight
        now, w, key, vals = heapq.heappop(events)
        free.append(w)
        idle_since[w] = now
        algo.tell([(key, vals, samples_of(vals))] if needs_samples else [(key, vals)])
        values_in_order.append(vals)
        told += 1
    end = busy_until_budget if busy_until_budget is not None else now
    # idle counted up to the moment the last proposal was handed out
    idle_open = sum(max(0.0, end - t) for t in idle_since.values() if t < end)
    idle = (min(idle_time, workers * end) + idle_open) / max(workers * end, 1e-12) if end > 0 else 0.0
    return {"idle": idle, "makespan": now, "told": told, "values": values_in_order}


def hv_of(values: list[list[float]]) -> float:
    F = -np.asarray(values, dtype=float)  # minimisation form of two accuracies
    return frontlib.hypervolume(F, [0.0, 0.0])


# ------------------------------------------------------------------ 3: the real driver
class InstantPool(WorkerPool):
    """``workers`` simulated workers that answer at once (scores from the recipe's hash): what is
    measured is the driver alone."""

    def __init__(self, workers: int) -> None:
        self.n = workers
        self.pending: list[tuple[int, Task]] = []
        self._handles = itertools.count(1)

    def submit(self, task: Task) -> int:
        h = next(self._handles)
        self.pending.append((h, task))
        return h

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        out = []
        for h, task in self.pending:
            hsh = sum(task.recipe_json.encode()) % 997 / 997
            scores = {task.objectives[0]: hsh, task.objectives[1]: 1.0 - hsh}
            out.append(Outcome(h, task, "sim", result={
                "number": task.number, "scores": scores, "error": None, "worker": "sim",
                "samples": {k: samples_of([v]) for k, v in scores.items()},
                "timings": {"materialize_s": 0.0, "evaluate_s": 0.0}}))
        self.pending = []
        return out

    def worker_of(self, handle: int) -> str:
        return "sim"

    @property
    def idle(self) -> int:
        return self.n - len(self.pending)

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def close(self) -> None:
        self.pending = []


def driver_run(url: str, algorithm: str, workers: int, budget: int, tmp: Path, profile: bool) -> dict:
    from fixtures_models import make_tiny_llama_family, placeholder_tasks  # torch and transformers for this part only

    from evomerge.run import StudyRun
    from evomerge.space import dump_space, load_space
    from evomerge.store import Store

    base, experts = make_tiny_llama_family(tmp, n_experts=2, seed=0)
    # a population of one per worker, as in the idle part (NSGA-II's default 16 hands out 16 a turn)
    pop = f", settings: {{pop_size: {max(32, workers)}}}" if algorithm in ("nsga2", "nsga2_steady") else ""
    placeholder_tasks(tmp, ("t1", "t2"))
    sp = tmp / "space.yaml"
    sp.write_text(f"""
base_model: {base}
models: [{experts[0]}, {experts[1]}]
genome: {{method: task_arithmetic, layer_groups: 2}}
objectives:
  - {{name: a, task: t1, metric: "exact_match,none"}}
  - {{name: b, task: t2, metric: "exact_match,none"}}
algorithm: {{name: {algorithm}{pop}}}
evaluation: {{task_paths: [tasks]}}
budget: {budget}
""")
    space = load_space(sp)
    store = Store(url)
    study = f"sim{uuid.uuid4().hex[:6]}"
    store.create_study(study, dump_space(space), [{"name": "a", "direction": "maximize"},
                                                  {"name": "b", "direction": "maximize"}], budget=budget)
    run = StudyRun(space, store, study, show_progress=False, pool=lambda cfg: InstantPool(workers))
    prof = cProfile.Profile() if profile else None
    sql = {"statements": 0, "commits": 0}  # SQL round trips (an executemany is one) and transactions

    def count_statement(*_: object) -> None:
        sql["statements"] += 1

    def count_commit(*_: object) -> None:
        sql["commits"] += 1

    event.listen(Engine, "before_cursor_execute", count_statement)
    event.listen(Engine, "commit", count_commit)
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    try:
        run.run()
    finally:
        if prof:
            prof.disable()
        wall = time.perf_counter() - t0
        event.remove(Engine, "before_cursor_execute", count_statement)
        event.remove(Engine, "commit", count_commit)
    counts = store.study_counts(study)
    store.close()
    top = None
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
        top = s.getvalue()
    return {"wall_s": wall, "complete": counts["complete"], "per_candidate_ms": 1000 * wall / budget,
            "candidates_per_s": budget / wall, "statements_per_candidate": sql["statements"] / budget,
            "commits_per_candidate": sql["commits"] / budget, "profile": top}


def pg_url() -> tuple[str, object]:
    import sqlalchemy as sa

    admin_url = os.environ.get("EVOMERGE_TEST_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432/postgres")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"evomerge_sim_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the driver's top calls (PostgreSQL, 512)")
    ap.add_argument("--algorithms", default="random,nsga2,nsga2_steady,nsga3,nsga3_steady,cmaes,cmaes_async,map,"
                    "map_async,map_nested,map_nested_async,m2n2,optuna_tpe")
    ap.add_argument("--skip-driver", action="store_true")
    ap.add_argument("--only-driver", action="store_true")
    a = ap.parse_args()
    algos = a.algorithms.split(",")
    seeds = [0, 1, 2] if a.quick else [0, 1, 2, 3, 4]
    result: dict = {"idle": [], "hv": [], "driver": []}

    print(f"{'algorithm':14} {'workers':>7} {'budget':>6} {'idle %':>7}  (mean over seeds {seeds})")
    for workers in () if a.only_driver else (64, 512):
        budget = 8 * workers if not a.quick else 4 * workers
        for name in algos:
            if name.startswith("optuna") and workers > 64:
                continue  # Optuna's samplers refit on every trial: thousands of asks take them minutes
            # MAP fits and runs NSGA-II on its surrogates every 16 points: a shorter run at 512 workers
            b = 2 * workers if name.startswith("map") and workers > 64 else budget
            runs = [simulate(name, workers, b, s) for s in seeds]
            idle = float(np.mean([r["idle"] for r in runs]))
            row = {"algorithm": name, "workers": workers, "budget": b, "idle": round(idle, 4),
                   "told": int(np.mean([r["told"] for r in runs]))}
            result["idle"].append(row)
            print(f"{name:14} {workers:7d} {b:6d} {100 * idle:7.2f}", flush=True)

    print(f"\nhypervolume at equal evaluations (64 workers), seeds {seeds}")
    for budget in () if a.only_driver else (256, 1024):
        hv = {}
        for name in ("nsga2", "nsga2_steady", "random"):
            if name not in algos:
                continue
            vals = [hv_of(simulate(name, 64, budget, s)["values"]) for s in seeds]
            hv[name] = (float(np.mean(vals)), float(np.std(vals)))
            result["hv"].append({"algorithm": name, "evaluations": budget, "hv_mean": round(hv[name][0], 5),
                                 "hv_std": round(hv[name][1], 5), "per_seed": [round(v, 5) for v in vals]})
            print(f"{name:14} {budget:5d} evals  HV {hv[name][0]:.4f} +- {hv[name][1]:.4f}", flush=True)

    print(f"\nhypervolume at equal evaluations (64 workers), generational against asynchronous, seeds {seeds}")
    pairs = (("nsga3", "nsga3_steady", (256, 1024)), ("map", "map_async", (256, 512)),
             ("map_nested", "map_nested_async", (256, 512)))
    for gen_name, async_name, budgets in () if a.only_driver else pairs:
        for budget in budgets:
            for name in (gen_name, async_name):
                if name not in algos:
                    continue
                vals = [hv_of(simulate(name, 64, budget, s)["values"]) for s in seeds]
                m, sd = float(np.mean(vals)), float(np.std(vals))
                result["hv"].append({"algorithm": name, "evaluations": budget, "hv_mean": round(m, 5),
                                     "hv_std": round(sd, 5), "per_seed": [round(v, 5) for v in vals]})
                print(f"{name:16} {budget:5d} evals  HV {m:.4f} +- {sd:.4f}", flush=True)

    print(f"\nCMA-ES, best a1 + a2 at equal evaluations (64 workers), seeds {seeds}")
    for budget in () if a.only_driver else (256, 1024):
        for name in ("cmaes", "cmaes_async"):
            if name not in algos:
                continue
            vals = [max(sum(v) for v in simulate(name, 64, budget, s)["values"]) for s in seeds]
            result["hv"].append({"algorithm": name, "evaluations": budget,
                                 "best_sum_mean": round(float(np.mean(vals)), 5),
                                 "best_sum_std": round(float(np.std(vals)), 5)})
            print(f"{name:14} {budget:5d} evals  best {np.mean(vals):.4f} +- {np.std(vals):.4f}", flush=True)

    if not a.skip_driver:
        print("\ndriver's own time per candidate (StudyRun over a pool that answers at once)")
        drv_algos = [n for n in (("random", "nsga2_steady") if a.quick else ("random", "nsga2_steady", "nsga2"))
                     if n in algos]
        for workers in (64, 512):
            budget = 512 if a.quick else 8 * workers
            for store_kind in ("sqlite", "postgresql"):
                for name in drv_algos:
                    with tempfile.TemporaryDirectory() as d:
                        tmp = Path(d)
                        if store_kind == "sqlite":
                            url, drop = f"sqlite:///{tmp / 'sim.db'}", None
                        else:
                            url, drop = pg_url()
                        try:
                            prof = a.profile and workers == 512 and store_kind == "postgresql"
                            r = driver_run(url, name, workers, budget, tmp, prof)
                        finally:
                            if drop:
                                drop()
                    top = r.pop("profile")
                    if top is not None:
                        print(top)
                    row = {"algorithm": name, "workers": workers, "store": store_kind, "budget": budget,
                           **{k: round(v, 3) for k, v in r.items() if isinstance(v, float)},
                           "complete": r["complete"]}
                    result["driver"].append(row)
                    print(f"{name:14} {store_kind:10} {workers:4d} workers {budget:5d} cand: "
                          f"{row['per_candidate_ms']:7.2f} ms/cand  {row['candidates_per_s']:7.1f} cand/s  "
                          f"{row['statements_per_candidate']:.2f} SQL, {row['commits_per_candidate']:.3f} commits "
                          f"per cand", flush=True)
    # the targets, read off the rows above
    idle_max = max((r["idle"] for r in result["idle"]
                    if not REGISTRY[r["algorithm"]].generational or r["algorithm"] == "map_nested_async"),
                   default=None)
    pg512 = [r["candidates_per_s"] for r in result["driver"] if r["store"] == "postgresql" and r["workers"] == 512]
    result["targets"] = {"idle_max_asynchronous": idle_max, "idle_target": 0.05,
                         "driver_pg_512_min_cand_s": min(pg512) if pg512 else None, "driver_target_cand_s": 200}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
