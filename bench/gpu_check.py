"""The GPU path, checked on a CUDA machine (not a test: CI has no GPU). Run from the repository root:
``python bench/gpu_check.py`` (needs the demo zoo; ``EVOMERGE_ZOO_DIR`` may point at a copy).

1. Every registered operator materialized on CUDA (eager, and with the fused Triton kernels) against
   the same recipe on the CPU: relative error of the task-vector part, ``|gpu - cpu| / |cpu - base|``
   over the whole model, and the share of entries off by more than 1e-5 (a TIES sign election of a
   near-zero sum may flip).
2. A search worker (``MergeWorker``, as the driver builds it, no Ray) on CUDA against one on the CPU:
   the same recipes of the demo space, lm-eval scores per objective, and the per-candidate timings.
3. ``evomerge merge --device cuda`` against the CPU on a mergekit YAML of the zoo.

Prints a table per part, then ``RESULT <json>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
GPU = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # "cpu" only to rehearse the script without a GPU


def groups_for(n_layers: int, k: int, g):
    from evomerge.recipe import LayerGroup

    def rnd(lo, hi):
        return [lo + (hi - lo) * float(v) for v in g.random(k)]

    out = [LayerGroup(name="embed", kind="embed", weights=rnd(0.2, 1.0), densities=rnd(0.3, 0.8))]
    for b in range(n_layers):
        out.append(
            LayerGroup(name=f"b{b}", kind="blocks", start=b, stop=b + 1, weights=rnd(0.2, 1.2), densities=rnd(0.3, 0.8))
        )
    out.append(LayerGroup(name="head", kind="head", weights=rnd(0.5, 1.0), densities=rnd(0.4, 0.9)))
    return out


def check_operators(base: str, experts: list[str]) -> dict:
    import numpy as np

    from evomerge.merge import OPERATORS, Materializer, get_operator
    from evomerge.recipe import Recipe

    texts = [[1, 5, 9, 3, 7, 2, 8, 8], [4, 4, 8, 1, 6, 2, 3], [10, 11, 12, 13, 14]]
    mats = {
        "cpu": Materializer(base, experts),
        "cuda": Materializer(base, experts, device=GPU),
        "cuda_fused": Materializer(base, experts, device=GPU, fused=True),
    }
    for m in mats.values():
        m.compute_fisher(texts)
    g = np.random.default_rng(0)
    out: dict[str, dict] = {}
    print(f"{'operator':18s}{'rel err cuda':>14s}{'rel err fused':>15s}{'off cuda':>10s}{'off fused':>11s}")
    for method in sorted(OPERATORS):
        spec = get_operator(method)
        k = len(experts)
        if spec.max_sources is not None and k > spec.max_sources:
            continue
        r = Recipe(
            base=base,
            sources=experts,
            method=method,
            groups=groups_for(mats["cpu"].num_layers, k, g),
            params={"t": 0.35} if method == "slerp" else {},
            seed=3,
        )
        res = {}
        try:
            ref = mats["cpu"].merged_state_dict(r)
            for dev in ("cuda", "cuda_fused"):
                got = mats[dev].merged_state_dict(r)
                num = den = 0.0
                off = tot = 0
                for name, t in ref.items():
                    if not t.is_floating_point():
                        continue
                    gt = got[name].cpu()
                    num += float((gt - t).double().pow(2).sum())
                    den += float((t - mats["cpu"].base[name]).double().pow(2).sum())
                    off += int(((gt - t).abs() > 1e-5).sum())
                    tot += t.numel()
                res[dev] = {"rel_err": (num / max(den, 1e-30)) ** 0.5, "off_frac": off / tot}
        except Exception as e:  # noqa: BLE001 - report every operator, whatever breaks
            res["error"] = f"{type(e).__name__}: {e}"
            print(f"{method:18s} ERROR {res['error']}")
            out[method] = res
            continue
        out[method] = res
        c, f = res["cuda"], res["cuda_fused"]
        print(
            f"{method:18s}{c['rel_err']:14.2e}{f['rel_err']:15.2e}{c['off_frac']:10.1e}{f['off_frac']:11.1e}",
            flush=True,
        )
    return out


def check_worker(n_candidates: int = 6) -> dict:
    import numpy as np

    from evomerge.genomes import make_genome
    from evomerge.space import load_space, portable_space
    from evomerge.workers import MergeWorker, WorkerConfig

    space = portable_space(load_space(ROOT / "search_spaces" / "demo.yaml"))

    def cfg(device: str) -> WorkerConfig:
        return WorkerConfig(
            kind=space.genome.type,
            base=space.model_ref(space.base_model),
            sources=[space.model_ref(m) for m in space.models],
            objectives=[o.model_dump() for o in space.all_objectives()],
            task_paths=space.task_dirs,
            batch_size=space.evaluation.batch_size,
            dtype=space.evaluation.dtype,
            device=device,
            fused=space.evaluation.fused_kernels,
        )

    genome = make_genome(space)
    rng = np.random.default_rng(1)
    recipes = [genome.decode([0.5] * genome.dim)] + [
        genome.decode(rng.random(genome.dim).tolist()) for _ in range(n_candidates - 1)
    ]
    rows = {}
    for device in ("cpu", "cuda"):
        t0 = time.perf_counter()
        w = MergeWorker(cfg(GPU if device == "cuda" else "cpu"))
        info = w.info()
        res = [w.evaluate(i, r.model_dump_json()) for i, r in enumerate(recipes)]
        errors = [x["error"] for x in res if x["error"]]
        rows[device] = {
            "startup_s": info["startup_s"],
            "merge_kernels": info.get("merge_kernels"),
            "wall_s": time.perf_counter() - t0,
            "scores": [x["scores"] for x in res],
            "samples": [x["samples"] for x in res],
            "materialize_s": float(np.median([x["timings"].get("materialize_s", np.nan) for x in res[1:]])),
            "evaluate_s": float(np.median([x["timings"].get("evaluate_s", np.nan) for x in res[1:]])),
            "errors": errors[:2],
        }
        del w
    same = diff = 0
    max_score_diff = 0.0
    for a, b in zip(rows["cpu"]["samples"], rows["cuda"]["samples"], strict=True):
        for name in a:
            sa, sb = np.array(a[name]), np.array(b.get(name, []))
            if sa.shape == sb.shape:
                same += int((sa == sb).sum())
                diff += int((sa != sb).sum())
    for a, b in zip(rows["cpu"]["scores"], rows["cuda"]["scores"], strict=True):
        for name in a:
            max_score_diff = max(max_score_diff, abs(a[name] - b.get(name, float("nan"))))
    print(f"{'device':8s}{'startup s':>11s}{'materialize s':>15s}{'evaluate s':>12s}{'kernels':>10s}  errors")
    for d, r in rows.items():
        print(
            f"{d:8s}{r['startup_s']:11.2f}{r['materialize_s']:15.4f}{r['evaluate_s']:12.3f}"
            f"{str(r['merge_kernels']):>10s}  {r['errors']}"
        )
    print(f"per-example agreement cpu vs cuda: {same}/{same + diff}; max |score diff| {max_score_diff:.4f}")
    for i, (a, b) in enumerate(zip(rows["cpu"]["scores"], rows["cuda"]["scores"], strict=True)):
        print(f"  cand {i}: cpu {json.dumps({k: round(v, 3) for k, v in a.items()})}")
        print(f"          cuda {json.dumps({k: round(v, 3) for k, v in b.items()})}")
    for r in rows.values():
        del r["samples"]
    return {"devices": rows, "examples_same": same, "examples_differ": diff, "max_score_diff": max_score_diff}


def check_merge_cli(base: str, experts: list[str]) -> dict:
    import torch
    import yaml

    from evomerge.merge import load_state_dict

    cfg = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "models": [{"model": e, "parameters": {"weight": 0.7, "density": 0.5}} for e in experts],
    }
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-gpu-"))
    y = tmp / "ties.yml"
    y.write_text(yaml.safe_dump(cfg))
    out, times = {}, {}
    for dev in ("cpu", "cuda"):
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "evomerge.cli", "merge", str(y), "--out", str(tmp / dev), "--device"]
            + [GPU if dev == "cuda" else "cpu"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        times[dev] = time.perf_counter() - t0
        if r.returncode != 0:
            return {"error": f"{dev}: {r.stderr.strip()[-300:]}"}
        out[dev] = load_state_dict(tmp / dev)
    worst = max(float((out["cuda"][n] - t).abs().max()) for n, t in out["cpu"].items())
    same = all(torch.equal(out["cuda"][n], t) for n, t in out["cpu"].items())
    print(f"evomerge merge ties: cpu {times['cpu']:.1f}s, cuda {times['cuda']:.1f}s; max |diff| {worst:.2e}")
    return {"wall_s": times, "max_abs_diff": worst, "bit_identical": same}


def main() -> None:
    import torch
    import transformers

    from evomerge.zoo import zoo_path

    assert GPU == "cpu" or torch.cuda.is_available(), "this check needs a CUDA device"
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if GPU != "cpu" else "cpu (rehearsal)",
    }
    print(json.dumps(env))
    zoo = Path(zoo_path())
    base, experts = str(zoo / "base"), [str(zoo / "arith"), str(zoo / "script")]
    result: dict = {"env": env}
    for part, fn in (
        ("operators", lambda: check_operators(base, experts)),
        ("worker", check_worker),
        ("merge_cli", lambda: check_merge_cli(base, experts)),
    ):
        print(f"\n== {part}", flush=True)
        t0 = time.perf_counter()
        try:
            result[part] = fn()
        except Exception as e:  # noqa: BLE001 - one broken part must not hide the others
            import traceback

            traceback.print_exc()
            result[part] = {"error": f"{type(e).__name__}: {e}"}
        print(f"({part}: {time.perf_counter() - t0:.1f}s)", flush=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
