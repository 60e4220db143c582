"""Materializer speed benchmark (issue 3): seconds per candidate against the memory-bandwidth floor.

Builds a ~130M-parameter Llama (hidden 768, 12 layers, intermediate 2048, vocab 32000, bf16, untied
head) base and 3 experts in a temp dir (in a child process, so this process's peak RSS is the
materializer's), then per operator reports:

- ``resident_s``: median seconds of ``Materializer.apply`` per candidate (sources resident, fused
  kernels on, several candidates with different per-group genes, after one warm-up call that pays
  for compilation, reported as ``first_s``);
- ``floor_s``: (bytes of base + task vectors read, plus the model written) / copy bandwidth measured
  in this run right before the operator's candidates (a 128 MB bf16 ``copy_``, best of 5);
- ``mergekit_s``: ``mergekit-yaml`` on the same recipe (uniform genes), whole process;
- ``evomerge_merge_s``: ``python -m evomerge.cli merge CONFIG --out DIR`` on the same YAML, whole process.

Prints a table, then ``RESULT <json>``. Usage: ``nice python bench/materialize.py [--skip-external]
[--candidates 5] [--ops linear,ties]``. Run alone on the machine: it measures bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CFG = dict(hidden=768, layers=12, inter=2048, vocab=32000, heads=12)
K = 3
OPS = ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "della"]


def make_models(out: Path, seed: int = 0) -> None:
    """Base and K experts (base + N(0, 0.002) in bf16), saved as HF folders; run in a child process."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    h, L, m, v = CFG["hidden"], CFG["layers"], CFG["inter"], CFG["vocab"]
    cfg = LlamaConfig(
        hidden_size=h,
        num_hidden_layers=L,
        intermediate_size=m,
        vocab_size=v,
        num_attention_heads=CFG["heads"],
        num_key_value_heads=CFG["heads"],
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    cfg.architectures = ["LlamaForCausalLM"]  # mergekit reads the architecture from config.json
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(L):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (m, h)
        shapes[p + "mlp.up_proj.weight"] = (m, h)
        shapes[p + "mlp.down_proj.weight"] = (h, m)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    g = torch.Generator().manual_seed(seed)
    base = {}
    for n, s in shapes.items():
        base[n] = (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
    for j, name in enumerate(["base"] + [f"expert{i}" for i in range(K)]):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        sd = (
            base
            if j == 0
            else {
                n: (t.float() + torch.randn(t.shape, generator=g) * 0.002).to(torch.bfloat16) for n, t in base.items()
            }
        )
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        del sd


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_buffers(device: str = "cpu", nbytes: int = 1 << 27) -> tuple:
    """Source and target of the bandwidth copy: 128 MB each, four times a server CPU's L3 (a 98 MB
    copy measured within 3% of a 512 MB one here, a 49 MB one 20% faster). Made once, before the
    memory baseline, so the per-operator measurements add nothing to the peak-RSS figure."""
    import torch

    a = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    return a, torch.empty_like(a)


def copy_bandwidth(bufs: tuple, device: str = "cpu", reps: int = 5) -> float:
    """Bytes moved (read + written) per second by a large bf16 copy_ on ``device``, best of ``reps``."""
    a, b = bufs
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / best


def rss_now() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mergekit_yaml(op: str, base: str, experts: list[str], w: list[float], dens: list[float]) -> dict:
    models = [{"model": e, "parameters": {"weight": x, "density": d}} for e, x, d in zip(experts, w, dens, strict=True)]
    if op == "linear":
        return {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "models": [{"model": e, "parameters": {"weight": x}} for e, x in zip(experts, w, strict=True)],
        }
    if op == "task_arithmetic":
        return {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "dtype": "bfloat16",
            "models": [{"model": e, "parameters": {"weight": x}} for e, x in zip(experts, w, strict=True)],
        }
    if op == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": base,
            "dtype": "bfloat16",
            "parameters": {"t": 0.4},
            "models": [{"model": base}, {"model": experts[0]}],
        }
    if op == "della":
        for mm in models:
            mm["parameters"]["epsilon"] = 0.1
    return {"merge_method": op, "base_model": base, "dtype": "bfloat16", "models": models}


def run_timed(cmd: list[str], cwd: Path) -> float | None:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        print(f"  ! {' '.join(cmd[:3])}... failed: {r.stderr.strip().splitlines()[-1:]} ", file=sys.stderr)
        return None
    return dt


def has_evomerge_merge() -> bool:
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", "--help"], cwd=ROOT, capture_output=True)
    return r.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make", help=argparse.SUPPRESS)
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--skip-external", action="store_true", help="no mergekit-yaml / evomerge merge runs")
    ap.add_argument("--no-fused", action="store_true", help="eager operators, or with --native the C kernels alone")
    ap.add_argument("--native", action="store_true", help="the C kernels without torch.compile (a CPU search worker)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (mergekit-yaml then runs with --cuda)")
    args = ap.parse_args()
    if args.make:
        make_models(Path(args.make))
        return

    import torch

    from evomerge.merge import Materializer
    from evomerge.recipe import LayerGroup, Recipe

    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make", str(tmp)], check=True)
        print(f"models written in {time.perf_counter() - t0:.1f}s to {tmp}")
        base = str(tmp / "base")
        experts = [str(tmp / f"expert{i}") for i in range(K)]
        dev = args.device
        bufs = copy_buffers(dev)
        bw = copy_bandwidth(bufs, dev)
        from evomerge.merge import kernels

        kernels.available(dev)  # the compile check's own allocations stay out of the baseline
        rss0 = rss_now()  # interpreter, torch, transformers: what any process has before the models
        t0 = time.perf_counter()
        mat = Materializer(base, experts, device=dev, dtype=torch.bfloat16, fused=not args.no_fused, native=args.native)
        load_s = time.perf_counter() - t0
        model = mat.new_model()
        model_bytes = mat.model_bytes()
        print(
            f"load {load_s:.1f}s, {mat.numel() / 1e6:.1f}M params, model {model_bytes / 1e9:.3f} GB, "
            f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write)"
        )
        g = torch.Generator().manual_seed(0)
        results: dict[str, dict] = {}
        ops = [o for o in args.ops.split(",") if o]
        evo_merge = not args.skip_external and has_evomerge_merge()
        for op in ops:
            m = mat.subset([0]) if op == "slerp" else mat
            k = m.n_sources
            read = sum(t.numel() * t.element_size() for t in m.base.values())
            read += sum(t.numel() * t.element_size() for t in m.deltas.values())
            # measured again right before each operator: the machine is shared and its bandwidth drifts
            # (28-73 GB/s between runs here), so a figure from minutes earlier misstates the floor
            bw_op = copy_bandwidth(bufs, dev)
            floor = (read + model_bytes) / bw_op
            times, first = [], None
            for c in range(args.candidates + 1):
                groups = [
                    LayerGroup(
                        name="embed",
                        kind="embed",
                        weights=(torch.rand(k, generator=g) + 0.2).tolist(),
                        densities=(torch.rand(k, generator=g) * 0.5 + 0.3).tolist(),
                    )
                ]
                for b in range(CFG["layers"]):
                    groups.append(
                        LayerGroup(
                            name=f"b{b}",
                            kind="blocks",
                            start=b,
                            stop=b + 1,
                            weights=(torch.rand(k, generator=g) + 0.2).tolist(),
                            densities=(torch.rand(k, generator=g) * 0.5 + 0.3).tolist(),
                        )
                    )
                groups.append(LayerGroup(name="head", kind="head", weights=[1.0] * k, densities=[0.6] * k))
                params = {"t": float(torch.rand((), generator=g))} if op == "slerp" else {}
                r = Recipe(base=base, sources=m.source_paths, method=op, groups=groups, params=params, seed=c)
                sync(dev)
                t = time.perf_counter()
                m.apply(r, model)
                sync(dev)
                dt = time.perf_counter() - t
                if c == 0:
                    first = dt
                else:
                    times.append(dt)
            res = {
                "resident_s": statistics.median(times),
                "floor_s": floor,
                "first_s": first,
                "copy_bandwidth_gbs": bw_op / 1e9,
                "mergekit_s": None,
                "evomerge_merge_s": None,
            }
            if not args.skip_external:
                w, dens = [0.6, 0.5, 0.4], [0.5, 0.6, 0.7]
                cfg = mergekit_yaml(op, base, experts, w, dens)
                import yaml

                cpath = tmp / f"{op}.yml"
                cpath.write_text(yaml.safe_dump(cfg))
                mk = [str(VENV_BIN / "mergekit-yaml")] if (VENV_BIN / "mergekit-yaml").exists() else None
                if mk is None:  # installed elsewhere (e.g. carried wheels): its module entry point
                    mk = [sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()"]
                cuda = ["--cuda"] if dev.startswith("cuda") else []
                res["mergekit_s"] = run_timed(
                    [*mk, str(cpath), str(tmp / f"mk_{op}"), "--no-copy-tokenizer", "--quiet", "--random-seed", "0"]
                    + cuda,
                    ROOT,
                )
                if evo_merge:
                    res["evomerge_merge_s"] = run_timed(
                        [sys.executable, "-m", "evomerge.cli", "merge", str(cpath), "--out", str(tmp / f"ev_{op}")]
                        + (["--device", dev] if cuda else []),
                        ROOT,
                    )
                for d in (tmp / f"mk_{op}", tmp / f"ev_{op}"):
                    shutil.rmtree(d, ignore_errors=True)
            results[op] = res
            print(
                f"  {op:16s} resident {res['resident_s']:.3f}s  floor {floor:.3f}s  "
                f"x{res['resident_s'] / floor:.2f}  (first {first:.2f}s)",
                flush=True,
            )
        peak_b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = peak_b / 1e9
        over = (peak_b - rss0) / 1e9  # what loading and merging added to the process's peak
        gpu_peak = torch.cuda.max_memory_allocated() / 1e9 if dev.startswith("cuda") else None
        resident = (mat.resident_bytes() + model_bytes) / 1e9
        print()
        print(
            f"{'operator':18s}{'resident_s':>11s}{'floor_s':>9s}{'x floor':>9s}{'mergekit_s':>12s}"
            f"{'evomerge_s':>12s}{'mk/resident':>13s}"
        )
        for op, r in results.items():
            mk, ev, rs = r["mergekit_s"], r["evomerge_merge_s"], r["resident_s"]
            mk_s = f"{mk:.1f}" if mk else "null"
            ev_s = f"{ev:.1f}" if ev else "null"
            ratio = f"{mk / rs:.0f}x" if mk else "-"
            print(f"{op:18s}{rs:11.3f}{r['floor_s']:9.3f}{rs / r['floor_s']:9.2f}{mk_s:>12s}{ev_s:>12s}{ratio:>13s}")
        mg = model_bytes / 1e9
        print(
            f"model {mg:.3f} GB; materializer resident + model {resident:.3f} GB "
            f"= {resident / mg:.2f} model sizes (budget (sources + 2) = {K + 3}, the base and {K} experts "
            f"being the sources); peak RSS {peak:.2f} GB, of which "
            f"{over:.2f} GB = {over / mg:.2f} model sizes over the {rss0 / 1e9:.2f} GB before loading"
            + (f"; GPU peak allocated {gpu_peak:.2f} GB = {gpu_peak / mg:.2f} model sizes" if gpu_peak else "")
            + f"; torch threads {torch.get_num_threads()}"
        )
        per_op = [r["copy_bandwidth_gbs"] for r in results.values()]
        print(
            f"copy bandwidth on {dev}: {bw / 1e9:.1f} GB/s at the start, {min(per_op):.1f}-{max(per_op):.1f} GB/s "
            "measured before each operator (its floor uses its own)"
        )
        out = {
            "operators": {
                op: {k2: r[k2] for k2 in ("resident_s", "floor_s", "mergekit_s", "evomerge_merge_s")}
                for op, r in results.items()
            },
            "peak_rss_gb": peak,
            "model_gb": model_bytes / 1e9,
            "rss_before_load_gb": rss0 / 1e9,
            "peak_rss_over_load_gb": over,
            "gpu_peak_allocated_gb": gpu_peak,
            "device": dev,
            "resident_gb": resident,
            "copy_bandwidth_gbs": bw / 1e9,
            "copy_bandwidth_gbs_per_op": {op: r["copy_bandwidth_gbs"] for op, r in results.items()},
            "first_call_s": {op: r["first_s"] for op, r in results.items()},
        }
        print("RESULT " + json.dumps(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
