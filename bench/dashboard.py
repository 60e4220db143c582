"""Dashboard speed on a generated study of 10,000 candidates and 3 objectives, on SQLite and PostgreSQL.

    python bench/dashboard.py [--candidates 10000] [--backends sqlite postgresql] [--runs 5]

For each backend: writes the study (candidates, scores, the hypervolume series through the run's own
recorder), starts `evomerge dashboard` on it (its own process, read-only), then measures
- every JSON call: the first answer after the study changed (computed) and the median of ``--runs``
  repeats (answered from the cache until the study changes again);
- page open: navigation until the page's data is drawn, in headless Chromium (Debian's package), the median of
  ``--runs`` opens, each of a study that just changed (``page_s_all``: every open);
- update latency: a result written to the store until an open Study page has drawn it.
Targets: a page under 2 s, a JSON call under 200 ms, an update under 2 s. PostgreSQL:
``$EVOMERGE_BENCH_POSTGRES`` (a URL of a server where the user may CREATE DATABASE), else root@127.0.0.1.
Prints a table and last a line `RESULT <json>`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.run.hvseries import HypervolumeSeries  # noqa: E402
from evomerge.store import Store  # noqa: E402
from evomerge.store.models import Candidate, Score  # noqa: E402

STUDY = "bench-10k"
OBJ = [{"name": "accuracy", "direction": "maximize"}, {"name": "reasoning", "direction": "maximize"},
       {"name": "size", "direction": "minimize"}]
CHROMIUM = os.environ.get("EVOMERGE_CHROMIUM", "/usr/bin/chromium")
SPACE_YAML = "name: bench-10k\nalgorithm: {name: nsga2}\ngenome: {method: ties}\nbudget: %d\n"


def generate(url: str, n: int, seed: int = 0) -> float:
    """Write the study; returns the seconds the hypervolume series took to record."""
    rng = np.random.default_rng(seed)
    store = Store(url)
    store.create_study(STUDY, SPACE_YAML % n, OBJ, budget=n, reference_point=[0.0, 0.0, 1.1])
    sid = store.get_study(STUDY).id
    t0 = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=6)
    cands, scores = [], []
    for i in range(1, n + 1):
        x = rng.random(8)
        failed = rng.random() < 0.03
        gen = (i - 1) // 100
        started = t0 + timedelta(seconds=2.0 * i + rng.random())
        recipe = {"kind": "parameter_space", "method": "ties", "base": "zoo://base",
                  "sources": ["zoo://math", "zoo://code"],
                  "groups": [{"name": f"g{j}", "kind": "all", "weights": [round(float(x[2 * j]), 4),
                                                                           round(float(x[2 * j + 1]), 4)],
                              "densities": None, "filter": None, "params": None, "start": None, "stop": None}
                             for j in range(4)],
                  "params": {}, "seed": 0, "version": 1}
        cands.append({
            "id": i, "study_id": sid, "number": i, "proposal_key": str(i), "genome": [float(v) for v in x],
            "recipe_json": json.dumps(recipe, sort_keys=True), "recipe_hash": uuid.uuid4().hex[:16],
            "parents": [int(p) for p in rng.integers(1, i, 2)] if i > 100 else [],
            "operator": "ties", "generation": gen, "niche": None,
            "state": "failed" if failed else "complete", "attempts": 1,
            "error": "RuntimeError: CUDA out of memory (generated)" if failed else None,
            "worker": f"actor-{i % 4}", "timings": {"materialize_s": 0.4, "evaluate_s": 1.5},
            "told_step": None, "heartbeat": None, "created": started, "started": started,
            "finished": started + timedelta(seconds=1.9)})
        if not failed:
            share = float(x[:4].sum() / x.sum())
            q = float(rng.random())
            acc = share * (0.6 + 0.4 * q)
            rea = (1 - share) * (0.5 + 0.5 * q)
            size = 0.3 + 0.7 * float(x[4:].mean()) * (0.5 + q / 2)
            scores += [{"candidate_id": i, "objective": o, "value": v}
                       for o, v in (("accuracy", acc), ("reasoning", rea), ("size", size))]
    with store.db.session(write=True) as s:
        s.execute(sa.insert(Candidate), cands)
        s.execute(sa.insert(Score), scores)
    if store.db.dialect == "postgresql":  # ids were given: move the sequences past them
        with store.db.session(write=True) as s:
            for table in ("candidates", "scores"):
                s.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                  f"(SELECT max(id) FROM {table}))"))
            # the statistics autovacuum would have gathered by the time a user opens a study this size
            # (this server runs with autovacuum off, and a bulk insert leaves the planner blind)
            s.execute(sa.text("ANALYZE candidates, scores"))
    t = time.perf_counter()
    HypervolumeSeries(store, STUDY, [o["name"] for o in OBJ], [o["direction"] for o in OBJ]).update()
    hv_s = time.perf_counter() - t
    store.close()
    return hv_s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(url: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", "from evomerge.cli import main; main()", "dashboard",
                             "--storage", url, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(base + "/api/config", timeout=1)
            return proc, base
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit(f"the dashboard did not start: {proc.stderr.read().decode()[-500:]}") from None
            time.sleep(0.1)
    raise SystemExit("the dashboard did not start in 60 s")


CALLS = {
    "studies": ("/api/studies", {}),
    "study": ("/api/study", {"study": STUDY}),
    "points": ("/api/points", {"study": STUDY}),
    "hypervolume": ("/api/hypervolume", {"study": STUDY}),
    "algorithm": ("/api/algorithm", {"study": STUDY}),
    "stamp": ("/api/stamp", {"study": STUDY}),
    "candidate": ("/api/candidate", {"study": STUDY, "number": 1000}),
}


def _time_get(client: httpx.Client, path: str, params: dict) -> tuple[float, int]:
    t = time.perf_counter()
    r = client.get(path, params=params)
    r.raise_for_status()
    return time.perf_counter() - t, len(r.content)


def _add_result(url: str, number_hint: int) -> None:
    """A new complete candidate, as a running search writes one."""
    w = Store(url)
    try:
        n = w.add_candidate(STUDY, proposal_key=f"late-{number_hint}-{uuid.uuid4().hex[:6]}", genome=[0.5],
                            recipe_json={"late": number_hint}, recipe_hash=uuid.uuid4().hex[:16])
        w.mark_running(STUDY, n, worker="actor-0")
        w.complete_candidate(STUDY, n, {"accuracy": 0.5, "reasoning": 0.5, "size": 0.5}, None, {})
    finally:
        w.close()


def measure(url: str, runs: int) -> dict:
    proc, base = _serve(url)
    out: dict = {"json_ms": {}, "json_cached_ms": {}, "bytes": {}}
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            client.get("/api/candidate", params=CALLS["candidate"][1])  # the mergekit import, once per server
            _add_result(url, 0)  # the first answers after a change are computed, not cached
            for name, (path, params) in CALLS.items():
                first, size = _time_get(client, path, params)
                warm = [_time_get(client, path, params)[0] for _ in range(runs)]
                out["json_ms"][name] = round(1000 * first, 1)
                out["json_cached_ms"][name] = round(1000 * statistics.median(warm), 1)
                out["bytes"][name] = size
        out.update(_browser(base, url, runs))
    finally:
        proc.terminate()
        proc.wait(10)
    return out


def _browser(base: str, url: str, runs: int) -> dict:
    from playwright.sync_api import sync_playwright  # only here: the JSON half runs without a browser

    res: dict = {"page_s": {}}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        pages = {"studies": ("/", "!!document.querySelector('#studies')"),
                 "study": (f"/study?name={STUDY}", "document.body.dataset.loaded !== undefined"),
                 "candidate": (f"/candidate?study={STUDY}&n=1000", "document.body.dataset.loaded !== undefined"),
                 "compare": (f"/compare?study={STUDY}", "document.body.dataset.loaded !== undefined")}
        res["page_s_all"] = {}
        for name, (path, ready) in pages.items():
            times = []
            for k in range(runs):
                # every open is of a study that just changed (nothing cached), from another page
                _add_result(url, 1000 * (len(res["page_s"]) + 1) + k)
                page.goto("about:blank")
                t = time.perf_counter()
                page.goto(base + path)
                page.wait_for_function(ready, timeout=60_000)
                times.append(time.perf_counter() - t)
                if name == "study" and k == 0:  # where the study page's time went: fetching and each plot
                    res["study_page_ms"] = page.evaluate("window.evomergeTimings")
            res["page_s"][name] = round(statistics.median(times), 3)
            res["page_s_all"][name] = [round(v, 3) for v in times]
        page.goto(base + f"/study?name={STUDY}")
        page.wait_for_function("document.body.dataset.loaded !== undefined", timeout=60_000)
        lat = []
        for k in range(3):
            before = int(page.evaluate("document.body.dataset.loaded"))
            t = time.perf_counter()
            _add_result(url, 100 + k)
            page.wait_for_function(f"+document.body.dataset.loaded > {before}", timeout=60_000)
            lat.append(time.perf_counter() - t)
        res["update_s"] = round(max(lat), 3)
        res["update_s_all"] = [round(v, 3) for v in lat]
        res["page_errors"] = errors
        browser.close()
    return res


def _pg_admin() -> sa.URL:
    u = sa.engine.make_url(os.environ.get("EVOMERGE_BENCH_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432/postgres"))
    return u.set(drivername="postgresql+psycopg") if u.drivername == "postgresql" else u


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=int, default=10_000)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="evomerge-dash-bench-") as tmp:
        for backend in args.backends:
            admin = None
            if backend == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            else:
                admin = sa.create_engine(_pg_admin(), isolation_level="AUTOCOMMIT")
                db = f"evomerge_bench_{uuid.uuid4().hex[:8]}"
                with admin.connect() as c:
                    c.execute(sa.text(f'CREATE DATABASE "{db}"'))
                url = _pg_admin().set(database=db).render_as_string(hide_password=False)
            try:
                t = time.perf_counter()
                hv_s = generate(url, args.candidates)
                gen_s = time.perf_counter() - t
                r = measure(url, args.runs)
                r.update(generate_s=round(gen_s, 1), hypervolume_series_s=round(hv_s, 1))
                results[backend] = r
            finally:
                if admin is not None:
                    with admin.connect() as c:
                        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
                    admin.dispose()
    for backend, r in results.items():
        print(f"\n{backend}: {args.candidates} candidates x 3 objectives "
              f"(generated in {r['generate_s']} s, hypervolume series {r['hypervolume_series_s']} s)")
        print(f"  {'JSON call':<12} {'computed ms':>12} {'cached ms':>10} {'bytes':>10}")
        for k in CALLS:
            print(f"  {k:<12} {r['json_ms'][k]:>12} {r['json_cached_ms'][k]:>10} {r['bytes'][k]:>10}")
        print("  page open s: " + ", ".join(f"{k} {v}" for k, v in r["page_s"].items()))
        print("  study page ms: " + ", ".join(f"{k} {v}" for k, v in (r.get("study_page_ms") or {}).items()))
        print(f"  update latency s: {r['update_s']} (worst of {r['update_s_all']})")
    ok = {b: {"page": max(r["page_s"].values()) < 2.0, "json": max(r["json_ms"].values()) < 200,
              "update": r["update_s"] < 2.0} for b, r in results.items()}
    load = [round(v, 1) for v in os.getloadavg()]  # the machine's load: timings on a busy one are longer
    print(f"load average {load} on {os.cpu_count()} cores")
    print("RESULT " + json.dumps({"candidates": args.candidates, "objectives": 3, "load_average": load,
                                  "cores": os.cpu_count(), "results": results,
                                  "targets_met": ok}))


if __name__ == "__main__":
    main()
