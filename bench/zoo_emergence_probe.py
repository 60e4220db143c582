"""Try a demo-zoo recipe fast: train it in-process, score the sources and cheap merges on every split.

    python bench/zoo_emergence_probe.py [--version 2] [--recipe FILE.json] [--samples 40] [--cache DIR]

Trains the recipe's base and experts (a recipe JSON overrides the version's: same keys as
``evomerge.zoo.RECIPES``), caching every trained model under ``--cache`` by a hash of what made it, so
trying another expert recipe on the same base costs only the expert. Scores (the zoo's greedy exact
match, as its lm-eval YAMLs score) the base, the experts, uniform task arithmetic over a weight grid,
and ``--samples`` random per-group task-arithmetic merges (embed, each block, head; weights in [0, 2])
ranked by the cross search split, which approximates what the demo search finds on that zoo.
Ends with ``RESULT {"sources", "grid", "random_best", "cross_test_ratio", "balanced"}``: the cross test of
the random merge with the best cross search score over the best source's, and the grid or random merge
that keeps the largest worst-case fraction of each expert's own search score (``kept``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.zoo import numerics  # noqa: E402
from evomerge.zoo.numerics import is_pinned, pinned_environ  # noqa: E402

if not is_pinned():  # train as the zoo build does: its numerics are read when torch loads
    os.execve(sys.executable, [sys.executable, *sys.argv], pinned_environ())

import torch  # noqa: E402

from evomerge.zoo import RECIPES, ZOO_VERSION, trains_exact  # noqa: E402
from evomerge.zoo import tasks as T  # noqa: E402
from evomerge.zoo.modeling import ModelSpec, TrainSpec, greedy_accuracy, make_model, make_tokenizer, train  # noqa: E402

SPLITS = [f"{t}_{s}" for t in T.EVAL_TASKS for s in ("search", "test")]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


class Probe:
    def __init__(self, recipe: dict, cache: Path):
        self.tok = make_tokenizer()
        self.spec = ModelSpec(**recipe["model"])
        self.cache = cache
        self.exact = trains_exact(recipe)
        cache.mkdir(parents=True, exist_ok=True)
        self.evals = {f"{t}_{s}": T.eval_set(t, s) for t in T.EVAL_TASKS for s in ("search", "test")}

    def fit(self, part: dict, start: dict | None, start_key: str) -> tuple[dict, str]:
        """Train ``part`` (a recipe's base or expert) from ``start`` (None: from scratch), cached."""
        key = _hash([start_key, part])
        f = self.cache / f"{key}.pt"
        if f.is_file():
            return torch.load(f), key
        model = make_model(self.spec, len(self.tok), self.tok, part["seed"])
        if start is not None:
            model.load_state_dict(start)
        data = T.mixture(part["mix"], part["examples"], part["seed"])
        ts = TrainSpec(steps=part["steps"], lr=part["lr"], batch=part["batch"], warmup=part["warmup"],
                       only=tuple(part["only"]) if part.get("only") else None)
        train(model, self.tok, data, ts, part["seed"], self.spec.max_len, exact=self.exact)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(state, f)
        return state, key

    def score(self, state: dict, splits: list[str] = SPLITS) -> dict[str, float]:
        model = make_model(self.spec, len(self.tok), self.tok, 0)
        model.load_state_dict(state)
        return {s: round(greedy_accuracy(model, self.tok, self.evals[s]), 3) for s in splits}


def group_of(name: str, layers: int) -> int:
    """0 embed, 1..layers the blocks, layers + 1 the head (final norm and lm_head)."""
    if "embed_tokens" in name:
        return 0
    if ".layers." in name:
        return 1 + int(name.split(".layers.")[1].split(".")[0])
    return layers + 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", type=int, default=max(RECIPES), help=f"zoo version (default {max(RECIPES)}; "
                    f"the demo's is {ZOO_VERSION})")
    ap.add_argument("--recipe", type=Path, default=None, help="a recipe JSON overriding the version's")
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/evomerge-zoo-probe"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the zoo build: same weights, and faster on a busy 2-core machine
    recipe = json.loads(args.recipe.read_text()) if args.recipe else RECIPES[args.version]
    probe = Probe(recipe, args.cache)
    # the scratch key covers what else makes the weights: the model's shape and the task definitions
    scratch = _hash([recipe["model"], "".join(T.alphabet()), T.ARITH_MAX, T.WORD_MIN, T.WORD_MAX, numerics.TAG,
                     trains_exact(recipe)])
    base, base_key = probe.fit(recipe["base"], None, scratch)
    sources = {"base": probe.score(base)}
    taus = {}
    for name, part in recipe["experts"].items():
        state, _ = probe.fit(part, base, base_key)
        sources[name] = probe.score(state)
        taus[name] = {k: state[k] - base[k] for k in base}
    for name, s in sources.items():
        print(f"{name:<12}" + " ".join(f"{k} {v:.3f}" for k, v in s.items()), flush=True)
    names = list(taus)
    quick = ["arith_search", "script_search", "cross_search"]
    grid = {}
    for wa in (0.5, 1.0, 1.5):
        for ws in (0.5, 1.0, 1.5):
            merged = {k: base[k] + wa * taus[names[0]][k] + ws * taus[names[1]][k] for k in base}
            grid[f"{wa}/{ws}"] = probe.score(merged, quick)
            print(f"TA {wa}/{ws}  " + " ".join(f"{k} {v:.3f}" for k, v in grid[f'{wa}/{ws}'].items()), flush=True)
    layers = recipe["model"]["layers"]
    groups = {k: group_of(k, layers) for k in base}
    rng = random.Random(0)
    best = None
    samples: list = []
    for _ in range(args.samples):
        w = [[rng.uniform(0, 2) for _ in range(layers + 2)] for _ in names]
        merged = {k: base[k] + sum(w[j][groups[k]] * taus[n][k] for j, n in enumerate(names)) for k in base}
        s = probe.score(merged, quick)
        samples.append((w, s))
        if best is None or s["cross_search"] > best[0]:
            best = (s["cross_search"], w, merged)
    assert best is not None
    random_best = {"weights": [[round(x, 3) for x in r] for r in best[1]], "scores": probe.score(best[2])}
    print("random best", json.dumps(random_best), flush=True)
    # the balanced merge: the largest worst-case fraction of each expert's own search score (grid and samples)
    own = {n: sources[n][f"{n}_search"] for n in names}

    def kept(s: dict) -> float:
        return min(s[f"{n}_search"] / own[n] if own[n] else 0.0 for n in names)

    pool = [(k, s) for k, s in grid.items()] + [(w, s) for w, s in samples]
    bal = max(pool, key=lambda ks: kept(ks[1]))
    balanced = {"merge": bal[0] if isinstance(bal[0], str) else [[round(x, 3) for x in r] for r in bal[0]],
                "search": bal[1], "kept": round(kept(bal[1]), 3)}
    print("balanced best", json.dumps(balanced), flush=True)
    best_source = max(s["cross_test"] for s in sources.values())
    ratio = round(random_best["scores"]["cross_test"] / best_source, 3) if best_source else None
    print("RESULT " + json.dumps({"recipe": _hash(recipe), "sources": sources, "grid": grid,
                                  "random_best": random_best, "cross_test_ratio": ratio,
                                  "balanced": balanced}))


if __name__ == "__main__":
    main()
