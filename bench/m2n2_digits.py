"""M2N2 on scikit-learn's bundled digits, the reference code's toy task (SakanaAI/natural_niches).

    nice -n 10 python bench/m2n2_digits.py [--forward-passes 3000] [--seeds 3] [--quick]

Setup as in the reference code: ``load_digits`` (8x8, raw pixel values 0-16), the first 80 % as the
training set (1437 images) and the rest as the test set (360), an MLP 64-256-10 (ReLU) whose 19 210
parameters are one flat vector, fitness = training accuracy, per-example scores = correctness of each
training image, archive of 20. Every method gets the same number of forward passes over the training
set (``--forward-passes``, counting the initial models' evaluations); test accuracy is measured once at
the end on the member (or point) with the best training accuracy, as the reference does.

(a) *From scratch*: M2N2 starts from two random models (N(0, 0.01²) weights) and mutates every child
    with N(0, 0.01²) noise (reference settings); CMA-ES starts from one such model with sigma0 = 0.01
    and population 20 (reference settings) but is **separable** CMA-ES (``cma`` option
    ``CMA_diagonal=True``: diagonal covariance), because full CMA-ES on 19 210 dimensions would need a
    19 210² covariance matrix (3 GB) and an eigendecomposition per update. The best-ever sample is
    tested, as the reference does.
(b) *From two seeds*: two models trained on digits 0-4 and 5-9 of the training set (reference recipe:
    N(0, 0.01²) init, 10 full-batch Adam steps, lr 0.003; numpy backprop here). M2N2 starts from the two
    (archive grows from 2, no mutation); the baseline is the reference's brute-force SLERP sweep between
    the two, with as many sweep points as M2N2 has forward passes, picking the best training accuracy.
(c) *Ablations*, from scratch as (a): ``alpha0`` (no competition: z = 1, plain fitness-proportional GA
    with attraction), ``no_split`` (one mixing weight for the whole vector), ``no_attraction`` (mate
    drawn by shared fitness, independently).

M2N2 here is the same code as the search algorithm: ``select_parents``, ``sample_crossover``,
``crossover_slerp`` / ``crossover`` and ``m2n2_step_update`` from ``evomerge.search.m2n2``, run on
flattened weights. The ``m2n2`` rows and the ablations use the reference code's split-point crossover,
SLERP with one angle for the whole vector (``crossover_slerp``); the ``m2n2_linear`` rows use the
linear split-point crossover (``crossover``, what the search algorithm does on genotypes, where children
must stay recipes). On random weights the linear crossover shrinks the norm of the near-orthogonal
parents (by up to 1/sqrt(2)), which costs M2N2 a lot from scratch; from the two seeds both do the same.

BLAS is pinned to one thread (on a shared 2-core machine, two BLAS threads were several times slower).
Prints a table and last a line ``RESULT <json>`` (test accuracies: mean and sample std over seeds).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.search.m2n2 import (  # noqa: E402
    crossover,
    crossover_slerp,
    m2n2_step_update,
    sample_crossover,
    select_parents,
)

IN, HID, OUT = 64, 256, 10
DIM = IN * HID + HID + HID * OUT + OUT  # 19 210, the reference's num_params
POP = 20
F32 = np.float32


# ----------------------------------------------------------------------------------- data and model
def load_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    n = int(len(X) * 0.8)  # 1437 / 360, unshuffled, as the reference's data.py
    return (X[:n].astype(F32), y[:n].astype(np.int64)), (X[n:].astype(F32), y[n:].astype(np.int64))


def unpack(p: np.ndarray):
    """Views (W1, b1, W2, b2) of a flat vector (D,) or a batch (P, D), in the reference's layout."""
    lead = p.shape[:-1]
    o = 0
    W1 = p[..., o:o + IN * HID].reshape(*lead, IN, HID)
    o += IN * HID
    b1 = p[..., o:o + HID]
    o += HID
    W2 = p[..., o:o + HID * OUT].reshape(*lead, HID, OUT)
    o += HID * OUT
    b2 = p[..., o:o + OUT]
    return W1, b1, W2, b2


def logits(params: np.ndarray, X: np.ndarray) -> np.ndarray:
    """(D,) -> (N, 10); (P, D) -> (P, N, 10)."""
    W1, b1, W2, b2 = unpack(params)
    if params.ndim == 1:
        return np.maximum(X @ W1 + b1, 0) @ W2 + b2
    H = np.maximum(np.matmul(X[None], W1) + b1[:, None, :], 0)
    return np.matmul(H, W2) + b2[:, None, :]


def correct(params: np.ndarray, X: np.ndarray, y: np.ndarray, chunk: int = 20) -> np.ndarray:
    """Per-example correctness as float (N,) or (P, N)."""
    if params.ndim == 1:
        return (logits(params, X).argmax(-1) == y).astype(np.float64)
    return np.concatenate([(logits(params[i:i + chunk], X).argmax(-1) == y[None]).astype(np.float64)
                           for i in range(0, params.shape[0], chunk)])


def train_seed_model(X: np.ndarray, y: np.ndarray, rng: np.random.Generator, lr: float = 0.003,
                     steps: int = 10) -> np.ndarray:
    """The reference's pre-training: N(0, 0.01²) init, ``steps`` full-batch Adam steps on the mean
    cross-entropy (optax defaults b1=0.9, b2=0.999, eps=1e-8)."""
    p = (rng.standard_normal(DIM) * 0.01).astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    Xd = X.astype(np.float64)
    onehot = np.eye(OUT)[y]
    for t in range(1, steps + 1):
        W1, b1, W2, b2 = unpack(p)
        pre = Xd @ W1 + b1
        H = np.maximum(pre, 0)
        L = H @ W2 + b2
        L = L - L.max(1, keepdims=True)
        P = np.exp(L)
        P /= P.sum(1, keepdims=True)
        dL = (P - onehot) / len(y)
        dH = (dL @ W2.T) * (pre > 0)
        g = np.concatenate([(Xd.T @ dH).ravel(), dH.sum(0), (H.T @ dL).ravel(), dL.sum(0)])
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        p = p - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return p.astype(F32)


def slerp(w: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The reference's SLERP (one angle for the whole vector; linear when the vectors are parallel)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    dot = np.clip(np.dot(x64 / np.linalg.norm(x64), y64 / np.linalg.norm(y64)), -1, 1)
    omega = np.arccos(dot)
    so = np.sin(omega)
    if so > 1e-6:
        out = np.sin((1 - w) * omega) / so * x64 + np.sin(w * omega) / so * y64
    else:
        out = (1 - w) * x64 + w * y64
    return out.astype(F32)


# ----------------------------------------------------------------------------------- methods
def run_m2n2(init_models: list[np.ndarray], data, budget: int, seed: int, *, alpha: float = 1.0,
             attraction: bool = True, split: bool = True, mutation: float = 0.0, linear: bool = False) -> dict:
    (Xtr, ytr), (Xte, yte) = data
    rng = np.random.default_rng(seed)
    archive = np.empty((0, DIM), F32)
    scores = np.empty((0, len(ytr)))
    passes = 0
    for m in init_models:
        archive, scores, _ = m2n2_step_update(archive, scores, m.astype(F32), correct(m, Xtr, ytr),
                                              alpha, POP)
        passes += 1
    replaced = 0
    while passes < budget:
        ia, ib = select_parents(scores, alpha, rng, attraction)
        sp, w = sample_crossover(rng, DIM, split)
        child = (crossover if linear else crossover_slerp)(archive[ia], archive[ib], sp, w)
        if mutation > 0:
            child = child + F32(mutation) * rng.standard_normal(DIM, dtype=F32)
        s = correct(child, Xtr, ytr)
        n_before = archive.shape[0]
        archive, scores, row = m2n2_step_update(archive, scores, child, s, alpha, POP)
        replaced += row is not None and n_before == POP
        passes += 1
    train_acc = scores.mean(1)
    best = int(np.argmax(train_acc))
    test = float(correct(archive[best], Xte, yte).mean())
    return {"test": test, "train": float(train_acc[best]), "passes": passes, "replacements": int(replaced)}


def run_cmaes(data, budget: int, seed: int, popsize: int = POP) -> dict:
    import cma

    (Xtr, ytr), (Xte, yte) = data
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(DIM) * 0.01
    es = cma.CMAEvolutionStrategy(x0, 0.01, {"popsize": popsize, "seed": seed + 1, "CMA_diagonal": True,
                                             "verbose": -9, "verb_log": 0, "verb_disp": 0,
                                             "maxiter": np.inf, "maxfevals": np.inf, "tolfun": 0,
                                             "tolx": 0, "tolstagnation": np.inf, "tolflatfitness": np.inf})
    passes, best_acc, best_x = 0, -1.0, None
    while passes + popsize <= budget:
        X = es.ask()
        P = np.asarray(X, dtype=F32)
        acc = correct(P, Xtr, ytr).mean(1)
        es.tell(X, (-acc).tolist())
        passes += popsize
        i = int(np.argmax(acc))
        if acc[i] > best_acc:
            best_acc, best_x = float(acc[i]), P[i].copy()
    test = float(correct(best_x, Xte, yte).mean())
    return {"test": test, "train": best_acc, "passes": passes}


def run_slerp_sweep(m1: np.ndarray, m2: np.ndarray, data, points: int) -> dict:
    (Xtr, ytr), (Xte, yte) = data
    ws = np.linspace(0.0, 1.0, points)
    best = (-1.0, 0.0)
    for i in range(0, points, POP):
        P = np.stack([slerp(w, m1, m2) for w in ws[i:i + POP]])
        acc = correct(P, Xtr, ytr).mean(1)
        j = int(np.argmax(acc))
        if acc[j] > best[0]:
            best = (float(acc[j]), float(ws[i + j]))
    test = float(correct(slerp(best[1], m1, m2), Xte, yte).mean())
    return {"test": test, "train": best[0], "passes": points, "best_w": best[1]}


# ----------------------------------------------------------------------------------- driver
def summary(runs: list[dict]) -> dict:
    t = np.array([r["test"] for r in runs])
    return {"mean": round(float(t.mean()), 4), "std": round(float(t.std(ddof=1)) if len(t) > 1 else 0.0, 4),
            "train_mean": round(float(np.mean([r["train"] for r in runs])), 4),
            "runs": [round(float(v), 4) for v in t]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forward-passes", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="600 forward passes, 2 seeds")
    ap.add_argument("--mutation", type=float, default=0.01, help="from-scratch mutation std (reference)")
    ap.add_argument("--only", default="", help="comma list among m2n2,m2n2_linear,alpha0,no_split,no_attraction,cmaes,"
                    "pretrained (default: all; RESULT then holds only those)")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    budget, n_seeds = (600, 2) if args.quick else (args.forward_passes, args.seeds)
    data = load_data()
    (Xtr, ytr), (Xte, yte) = data
    seeds = list(range(n_seeds))

    configs = {
        ("from_scratch", "m2n2"): {},
        ("from_scratch", "m2n2_linear"): {"linear": True},
        ("ablations", "alpha0"): {"alpha": 0.0},
        ("ablations", "no_split"): {"split": False},
        ("ablations", "no_attraction"): {"attraction": False},
    }
    keys = [*configs, ("from_scratch", "cmaes"), ("pretrained_seeds", "m2n2"), ("pretrained_seeds", "m2n2_linear"),
            ("pretrained_seeds", "slerp_sweep")]
    if only:
        keys = [k for k in keys if ("pretrained" in only if k[0] == "pretrained_seeds" else k[1] in only)]
        configs = {k: v for k, v in configs.items() if k in keys}
    results: dict[tuple[str, str], list[dict]] = {k: [] for k in keys}
    seed_models = []
    timing: dict[tuple[str, str], float] = {k: 0.0 for k in results}
    t_all = time.perf_counter()
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        scratch = [(rng.standard_normal(DIM) * 0.01).astype(F32) for _ in range(2)]
        for key, kw in configs.items():
            t0 = time.perf_counter()
            results[key].append(run_m2n2(scratch, data, budget, seed, mutation=args.mutation, **kw))
            timing[key] += time.perf_counter() - t0
            print(f"seed {seed} {key[0]}/{key[1]}: {results[key][-1]}", file=sys.stderr, flush=True)
        if ("from_scratch", "cmaes") in results:
            t0 = time.perf_counter()
            results[("from_scratch", "cmaes")].append(run_cmaes(data, budget, seed))
            timing[("from_scratch", "cmaes")] += time.perf_counter() - t0
            print(f"seed {seed} cmaes: {results[('from_scratch', 'cmaes')][-1]}", file=sys.stderr, flush=True)
        if ("pretrained_seeds", "m2n2") not in results:
            continue
        low = ytr < 5
        m1 = train_seed_model(Xtr[low], ytr[low], rng)
        m2 = train_seed_model(Xtr[~low], ytr[~low], rng)
        seed_models.append([float(correct(m, Xte, yte).mean()) for m in (m1, m2)])
        for name, kw in (("m2n2", {}), ("m2n2_linear", {"linear": True})):
            t0 = time.perf_counter()
            results[("pretrained_seeds", name)].append(run_m2n2([m1, m2], data, budget, seed, **kw))
            timing[("pretrained_seeds", name)] += time.perf_counter() - t0
        t0 = time.perf_counter()
        results[("pretrained_seeds", "slerp_sweep")].append(run_slerp_sweep(m1, m2, data, budget))
        timing[("pretrained_seeds", "slerp_sweep")] += time.perf_counter() - t0
        print(f"seed {seed} pretrained (seed models test acc {seed_models[-1]}): "
              f"m2n2 {results[('pretrained_seeds', 'm2n2')][-1]} "
              f"m2n2_linear {results[('pretrained_seeds', 'm2n2_linear')][-1]} "
              f"slerp {results[('pretrained_seeds', 'slerp_sweep')][-1]}", file=sys.stderr, flush=True)

    out: dict = {"forward_passes": budget, "seeds": n_seeds}
    for (group, name), runs in results.items():
        out.setdefault(group, {})[name] = summary(runs)
    if seed_models:
        sm = np.array(seed_models)
        out["seed_models_test"] = {"digits_0_4": round(float(sm[:, 0].mean()), 4),
                                   "digits_5_9": round(float(sm[:, 1].mean()), 4)}
    out["seconds"] = round(time.perf_counter() - t_all, 1)

    print(f"\nM2N2 on digits (MLP 64-256-10, train 1437 / test 360), {budget} forward passes per run, "
          f"{n_seeds} seeds; test accuracy of the best-on-train member")
    print(f"{'setting':<18} {'method':<15} {'test mean':>9} {'test std':>9} {'train mean':>10} {'s/run':>7}")
    for group, name in results:
        s = out[group][name]
        print(f"{group:<18} {name:<15} {s['mean']:>9.4f} {s['std']:>9.4f} {s['train_mean']:>10.4f} "
              f"{timing[(group, name)] / n_seeds:>7.1f}")
    if seed_models:
        print(f"seed models' test accuracy (mean over seeds): 0-4 model "
              f"{out['seed_models_test']['digits_0_4']:.4f}, 5-9 model {out['seed_models_test']['digits_5_9']:.4f}")
    print("RESULT " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
