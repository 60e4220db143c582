"""Search throughput on the demo zoo: candidates per minute with 1 and 2 workers, and where a
candidate's time goes (materializing and evaluating on a worker, the driver's own work).

    python bench/throughput.py [--budget 24] [--workers 1 2]

Each run is a real `evomerge search` (own process, own SQLite file, local Ray). The rate counts from
the first candidate started to the last finished, so Ray start-up and model loading are reported apart.
Prints a table and last a line `RESULT <json>`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(budget: int, workers: int, tmp: Path) -> dict:
    space = tmp / f"space_w{workers}.yaml"
    text = (ROOT / "search_spaces" / "demo.yaml").read_text()
    text = re.sub(r"^budget: \d+", f"budget: {budget}", text, flags=re.M)
    text = text.replace("task_paths: [demo_tasks]", f"task_paths: [{ROOT / 'search_spaces' / 'demo_tasks'}]")
    # Held-out scoring of the front is not part of the search rate.
    text = re.sub(r"^report:\n(  .*\n)+", "", text, flags=re.M)
    space.write_text(text)
    db = tmp / f"w{workers}.db"
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "search", "--space", str(space), "--workers", str(workers),
         "--storage", f"sqlite:///{db}", "--study", f"w{workers}", "--no-progress"],
        capture_output=True, text=True, cwd=tmp,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"search with {workers} workers failed:\n{r.stderr[-2000:]}")
    m = re.search(r"driver ([0-9.]+)s", r.stderr)
    from evomerge.store import Store

    store = Store(f"sqlite:///{db}")
    rows = [c for c in store.candidates(f"w{workers}") if c.state == "complete" and c.started and c.finished]
    start = min(c.started for c in rows)
    end = max(c.finished for c in rows)
    span = (end - start).total_seconds()
    mat = [c.timings["materialize_s"] for c in rows if c.timings and "materialize_s" in c.timings]
    ev = [c.timings["evaluate_s"] for c in rows if c.timings and "evaluate_s" in c.timings]
    return {
        "workers": workers,
        "candidates": len(rows),
        "wall_s": round(wall, 1),
        "search_span_s": round(span, 1),
        "startup_s": round(wall - span, 1),
        "per_minute": round(60 * len(rows) / span, 2) if span > 0 else None,
        "materialize_s": round(statistics.median(mat), 4),
        "evaluate_s": round(statistics.median(ev), 4),
        "driver_s": float(m.group(1)) if m else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    from evomerge.zoo import build_zoo

    build_zoo(log=lambda m: print(f"zoo: {m}", file=sys.stderr))
    results = []
    with tempfile.TemporaryDirectory() as d:
        for w in args.workers:
            results.append(run_one(args.budget, w, Path(d)))
    print(f"{'workers':>7} {'cands':>5} {'per min':>8} {'startup s':>9} {'materialize s':>13} "
          f"{'evaluate s':>10} {'driver s':>8}")
    for r in results:
        print(f"{r['workers']:>7} {r['candidates']:>5} {r['per_minute']:>8} {r['startup_s']:>9} "
              f"{r['materialize_s']:>13} {r['evaluate_s']:>10} {r['driver_s']!s:>8}")
    print("RESULT " + json.dumps({"budget": args.budget, "date": datetime.now().isoformat(timespec="seconds"),
                                  "runs": results}))


if __name__ == "__main__":
    main()
