"""Where a resident candidate's time goes, against the copy bandwidth of the same moment (issue 3).

The benchmark machine's copy bandwidth is bimodal (about 40-48 or 76-91 GB/s, for tens of seconds
at a time), so ``bench/materialize.py``'s floor ratios depend on the moment. This script alternates,
round after round on ``bench/materialize.py``'s 134M-parameter model:

- the copy bandwidth (128 MB bf16 ``copy_``, best of 5) and the floor it gives;
- ``Materializer.apply`` of one operator (best of 5): on the CPU, one call of the C kernels of
  :mod:`evomerge.merge.native` over the whole model, after the materializer filled its table;
- that C call alone, on a table filled once (best of 5): the gap to ``apply`` is the materializer's
  own work per candidate;
- the operator's compiled kernel called directly on every tensor of the model, split into the two
  vocabulary-sized tensors and all the others (best of 5): the per-tensor path that ``apply`` took
  before the C kernels (and still takes where they do not apply).

Usage: ``nice python bench/apply_breakdown.py [--op task_arithmetic|ties|dare_ties] [--rounds 10]``.
Run alone on the machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from materialize import K, copy_bandwidth, copy_buffers  # noqa: E402


def best(f, reps: int = 5) -> float:
    m = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        m = min(m, time.perf_counter() - t)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="task_arithmetic", choices=["task_arithmetic", "ties", "dare_ties"])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    import torch

    from evomerge.merge import Materializer, kernels, native
    from evomerge.merge.draws import keep_threshold, noise_keys
    from evomerge.recipe import LayerGroup, Recipe

    tmp = Path(tempfile.mkdtemp(prefix="evomerge-breakdown-"))
    try:
        subprocess.run([sys.executable, str(HERE / "materialize.py"), "--make", str(tmp)], check=True)
        base, experts = str(tmp / "base"), [str(tmp / f"expert{i}") for i in range(K)]
        bufs = copy_buffers()
        mat = Materializer(base, experts, dtype=torch.bfloat16, fused=True)
        model = mat.new_model()
        params = dict(model.named_parameters())
        moved = sum(t.numel() * t.element_size() for t in [*mat.base.values(), *mat.deltas.values()])
        moved += mat.model_bytes()
        g = torch.Generator().manual_seed(0)

        def recipe(seed: int) -> Recipe:
            def genes() -> dict:
                return {"weights": (torch.rand(K, generator=g) + 0.2).tolist(),
                        "densities": (torch.rand(K, generator=g) * 0.5 + 0.3).tolist()}  # fmt: skip

            groups = [LayerGroup(name=f"b{i}", kind="blocks", start=i, stop=i + 1, **genes()) for i in range(12)]
            groups += [LayerGroup(name="e", kind="embed", **genes()), LayerGroup(name="h", kind="head", **genes())]
            return Recipe(base=base, sources=experts, method=args.op, groups=groups, seed=seed)

        # the kernel on every tensor, with fixed genes: what apply would cost with no work of its own
        w, lam = torch.tensor([0.5, 0.4, 0.3]), torch.tensor(1.0)
        keys, below = noise_keys(0, "x", K), keep_threshold(torch.tensor([0.5, 0.6, 0.7]))
        thr = torch.full((K,), 0.0015)
        items = [(params[n].data.reshape(-1), mat.base[n].reshape(-1), mat.deltas[n].reshape(K, -1))
                 for n in mat.deltas if n in params]  # fmt: skip
        big = [it for it in items if it[1].numel() > 1 << 22]
        rest = [it for it in items if it[1].numel() <= 1 << 22]

        @torch.no_grad()  # as apply: dynamo compiles another, slower, variant for grad mode (measured)
        def direct(subset) -> None:
            for out, b, d in subset:
                if args.op == "task_arithmetic":
                    kernels._compiled("ta")(out, b, d, w, lam)
                elif args.op == "ties":
                    kernels._compiled("ties")(out, b, d, thr, w, lam, True)
                else:
                    kernels._compiled("dare_ties")(out, b, d, keys, below, w, w, lam, False)

        mat.apply(recipe(0), model)
        direct(items)
        r0 = recipe(0)
        segs = mat._native_segments(r0, *mat._check(r0), mat._targets(model))

        def c_call() -> None:
            native.merge_segments(segs, K, mat.dtype)

        if segs is None:
            print("the C kernels do not apply here: 'C call' is apply's own path")
            c_call = lambda: mat.apply(r0, model)  # noqa: E731
        print(f"{args.op}: {len(big)} vocabulary-sized tensors, {len(rest)} others; times are best of 5")
        for r in range(args.rounds):
            bw = copy_bandwidth(bufs)
            a = best(lambda r=r: mat.apply(recipe(r + 1), model))
            c = best(c_call)
            kb, kr = best(lambda: direct(big)), best(lambda: direct(rest))
            floor, k = moved / bw, kb + kr
            print(
                f"copy {bw / 1e9:5.1f} GB/s  floor {floor * 1e3:5.1f} ms | apply {a * 1e3:5.1f} ms = x{a / floor:.2f}"
                f" | C call {c * 1e3:5.1f} ms = x{c / floor:.2f}"
                f" | compiled per tensor: {kb * 1e3:5.1f} + {kr * 1e3:5.1f} = {k * 1e3:5.1f} ms = x{k / floor:.2f}",
                flush=True,
            )
            time.sleep(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
