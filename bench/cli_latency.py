"""Wall time of the command line's light commands, its error paths and `export`, each a whole process.

    python bench/cli_latency.py --storage sqlite:////tmp/demo.db --study demo --candidate 1 [--root TREE]

Runs each command ``--repeat`` times (default 3) through ``python -m evomerge.cli`` with ``TREE`` (default:
this checkout) first on ``PYTHONPATH`` and reports the fastest and the median wall time, and the fastest
CPU time (user + system of the process: on a busy machine a steadier figure than wall time). The study must exist in
the storage (a small demo search makes one). Export writes into a temporary folder each time. Prints a
table and last `RESULT <json>`.
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


def commands(a: argparse.Namespace, tmp: Path) -> dict[str, list[str]]:
    spaces = Path(a.root) / "search_spaces"
    exists = tmp / "exists"
    exists.mkdir(exist_ok=True)
    (exists / "keep").write_text("x")
    st = ["--storage", a.storage]
    return {
        "--help": ["--help"],
        "status": ["status", *st],
        "front": ["front", a.study, *st],
        "validate demo.yaml": ["validate", "--space", str(spaces / "demo.yaml")],
        "validate ja_math.yaml": ["validate", "--space", str(spaces / "ja_math.yaml")],
        "error: validate missing file": ["validate", "--space", str(tmp / "nope.yaml")],
        "error: front unknown study": ["front", "nope", *st],
        "error: search --workers 0": ["search", "--space", str(spaces / "demo.yaml"), "--workers", "0"],
        "error: export no such candidate": ["export", a.study, "--candidate", "9999", "--out", str(tmp / "o"), *st],
        "error: export folder exists": ["export", a.study, "--candidate", str(a.candidate), "--out", str(exists), *st],
        "export": ["export", a.study, "--candidate", str(a.candidate), "--out", "{OUT}", *st],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True)
    ap.add_argument("--study", required=True)
    ap.add_argument("--candidate", type=int, default=1)
    ap.add_argument("--root", default=str(ROOT), help="the evomerge tree to time")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": a.root}
    results: dict[str, dict[str, float | int]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, args in commands(a, tmp).items():
            times, cpus, rc = [], [], 0
            for i in range(a.repeat):
                out = tmp / f"export-{i}"
                argv = [str(out) if x == "{OUT}" else x for x in args]
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "evomerge.cli", *argv], env=env, cwd=tmp,
                                   capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
                rc = p.returncode
                shutil.rmtree(out, ignore_errors=True)
            results[name] = {"min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3),
                             "cpu_s": round(min(cpus), 3), "rc": rc}
            print(f"{name:34s} {min(times):7.3f}s  median {statistics.median(times):7.3f}s  "
                  f"cpu {min(cpus):7.3f}s  exit {rc}", flush=True)
    print("RESULT " + json.dumps({"root": a.root, "repeat": a.repeat, "commands": results}))


if __name__ == "__main__":
    main()
