"""Shared pieces of the search benchmarks: an in-process ask/tell loop over the real evaluation path.

The benchmarks compare algorithms at equal numbers of evaluations, so they skip Ray and the store (whose
costs do not depend on the algorithm) and call the same MergeWorker a search's actors run. Scores are
cached by recipe hash across runs: evaluation is deterministic, so a repeated recipe costs nothing and
still counts as an evaluation of the algorithm that proposed it.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge import front as frontlib  # noqa: E402
from evomerge.fidelity import MultiFidelity, plan_anchors  # noqa: E402
from evomerge.genomes import make_genome  # noqa: E402
from evomerge.objectives import supports_fidelity  # noqa: E402
from evomerge.run import algorithm_settings, worker_config  # noqa: E402
from evomerge.search import make_algorithm  # noqa: E402
from evomerge.space import SearchSpace, load_space  # noqa: E402
from evomerge.workers import MergeWorker  # noqa: E402


def demo_space(tmp: Path, *, limit: int | None = None, edits: dict[str, str] | None = None) -> SearchSpace:
    """search_spaces/demo.yaml without its report objectives, optionally with an example limit."""
    text = (ROOT / "search_spaces" / "demo.yaml").read_text()
    text = re.sub(r"^report:\n(  .*\n)+", "", text, flags=re.M)
    text = text.replace("task_paths: [demo_tasks]", f"task_paths: [{ROOT / 'search_spaces' / 'demo_tasks'}]")
    for old, new in (edits or {}).items():
        text = re.sub(old, new, text, flags=re.M)
    if limit:
        text = text.replace("    metric: exact_match,none\n", f"    metric: exact_match,none\n    limit: {limit}\n")
    p = tmp / "bench_space.yaml"
    p.write_text(text)
    return load_space(p)


class Evaluations:
    """One resident worker plus a result cache keyed by recipe hash."""

    def __init__(self, space: SearchSpace):
        from evomerge.zoo import build_zoo

        for version in space.zoo_versions:
            build_zoo(log=lambda m: print(m, file=sys.stderr), version=version)
        self.space = space
        self.genome = make_genome(space)
        self.names = [o.name for o in space.objectives]
        self.worker = MergeWorker(worker_config(space))
        self.cache: dict[str, tuple[list[float], list[float]]] = {}
        self.calls = 0
        self.seconds = 0.0
        self.fidelity: list[float] = []  # per multi-fidelity evaluation: share of the examples scored
        self.estimate_errors: list[float] = []  # anchors: |estimate - full score| of the fully scored ones
        self.samples: dict[str, dict[str, list[float]]] = {}  # per recipe hash: full per-example scores
        self.last_full: dict[str, list[float]] | None = None  # the last score()'s samples, if fully scored

    def score(self, x: list[float], front: list[list[float]] | None = None,
              fidelity: dict | None = None) -> tuple[list[float] | None, list[float]]:
        recipe = self.genome.decode(x)
        h = recipe.hash()
        self.last_full = None
        if fidelity is not None and front:
            # Staged evaluation depends on the front at the time: share of examples kept; only a full
            # result is cached.
            t0 = time.perf_counter()
            res = self.worker.evaluate(0, recipe.canonical_json(), self.names, front, fidelity)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            t = res["timings"]
            self.fidelity.append(t.get("fidelity", 1.0))
            if "anchor_error" in t:
                self.estimate_errors.append(t["anchor_error"])
            if res["error"]:
                return None, []
            values = [res["scores"][n] for n in self.names]
            if not t.get("pruned"):
                self.samples[h] = res["samples"]
                self.last_full = res["samples"]
                self.cache.setdefault(h, (values, [v for n in self.names for v in res["samples"][n]]))
            return values, []
        if fidelity is not None:
            self.fidelity.append(1.0)
        if h not in self.cache:
            t0 = time.perf_counter()
            res = self.worker.evaluate(0, recipe.canonical_json(), self.names)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            if res["error"]:
                return None, []
            values = [res["scores"][n] for n in self.names]
            flat = [v for n in self.names for v in res["samples"][n]]
            self.cache[h] = (values, flat)
            self.samples[h] = res["samples"]
        self.last_full = self.samples.get(h)
        return self.cache[h]


def run_algorithm(ev: Evaluations, name: str, budget: int, seed: int, fidelity: dict | None = None,
                  anchors: dict | None = None, **settings) -> list[list[float] | None]:
    """Values of every evaluation, in the order they were told (generation barriers respected).

    With ``fidelity`` (a MultiFidelity dict), each candidate is scored in stages against the front of
    everything evaluated before its batch, as the driver does at dispatch. With ``anchors`` (MultiFidelity
    settings of ``method: anchors``), the anchor plan is learned, as the driver learns it, from the
    candidates of this run scored in full so far.
    """
    refs: list[dict[str, list[float]]] = []
    if anchors is not None:
        fid_settings = MultiFidelity(**{**anchors, "method": "anchors"})
        fidelity = fid_settings.model_dump()
    space = ev.space.model_copy(update={"algorithm": ev.space.algorithm.model_copy(
        update={"name": name, "settings": settings})})
    algo = make_algorithm(name, dim=ev.genome.dim, directions=[o.direction for o in ev.space.objectives],
                          seed=seed, weights=[o.weight for o in ev.space.objectives],
                          **algorithm_settings(space, ev.genome))
    out: list[list[float] | None] = []
    estimated: set[int] = set()  # indices of the evaluations that are estimates, not full scores
    while len(out) < budget:
        props = algo.ask(min(8, budget - len(out)))
        if not props:
            break
        results = []
        front = None
        if anchors is not None:
            staged = [o.name for o in ev.space.objectives if supports_fidelity(o)]
            plan = {}
            if len(refs) >= fid_settings.min_reference:
                plan = plan_anchors({n: np.array([r[n] for r in refs]) for n in staged}, fid_settings.fraction,
                                    seed % (2**32), confirm=fid_settings.confirm,
                                    confirm_steps=fid_settings.confirm_steps)
            fidelity = {**fid_settings.model_dump(), "anchors": plan}
        if fidelity is not None:  # the driver's reference point: every objective of the demo is an accuracy
            dirs = [o.direction for o in ev.space.objectives]
            fidelity = {**fidelity, "reference": accuracy_reference(len(dirs), dirs).tolist()}
        if fidelity is not None:
            done = [v for i, v in enumerate(out) if v is not None and i not in estimated]
            if done:
                dirs = [o.direction for o in ev.space.objectives]
                F = np.array(done)
                front = F[frontlib.non_dominated(frontlib.to_minimization(F, dirs))].tolist()
        for p in props:
            values, flat = ev.score(p.x, front, fidelity)
            if ev.last_full is not None:
                refs.append(ev.last_full)
            elif values is not None and front:
                estimated.add(len(out))
            out.append(values)
            if values is not None and algo.needs_samples:
                results.append((p.key, values, flat))
            else:
                results.append((p.key, values))
        algo.tell(results)
    # an estimate is no result: never on the front, not in the hypervolume (as in the store's view)
    return [None if i in estimated else v for i, v in enumerate(out)]


def hv_curve(values: list[list[float] | None], directions: list[str], ref: np.ndarray) -> list[float]:
    """Hypervolume of everything evaluated so far, after each evaluation."""
    F = frontlib.to_minimization(values, directions)
    return [frontlib.hypervolume(F[: i + 1], ref) for i in range(len(F))]


def accuracy_reference(n_obj: int, directions: list[str]) -> np.ndarray:
    return frontlib.reference_point_from_bounds([(0.0, 1.0)] * n_obj, directions)
