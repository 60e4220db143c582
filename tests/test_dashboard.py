"""The dashboard's JSON API over SQLite and PostgreSQL while a real search writes to the same database:
every answer agrees with the store, nothing is written, only GET is served, assets stay in their folder."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from dashboard_studies import run_search
from fastapi.testclient import TestClient
from sqlalchemy import event

from evomerge.dashboard import create_app
from evomerge.dashboard.data import front_mask
from evomerge.front import non_dominated
from evomerge.store import Store
from evomerge.view import StudyView


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dash.db'}"
    return request.getfixturevalue("fresh_pg_url")


def _reader(url: str, seen: list, stop: threading.Event, errors: list) -> None:
    """Poll the API as an open page does until the search ends; keep what each poll saw."""
    store = None
    try:
        while store is None and not stop.is_set():
            try:
                store = Store(url, read_only=True)
                if not store.has_study("live"):
                    store.close()
                    store = None
                    time.sleep(0.05)
            except Exception:  # noqa: BLE001 - the writer has not created the schema yet
                store = None
                time.sleep(0.05)
        client = TestClient(create_app(store))
        while True:
            done = stop.is_set()
            stamp = client.get("/api/stamp", params={"study": "live"}).json()
            pts = client.get("/api/points", params={"study": "live"}).json()
            hv = client.get("/api/hypervolume", params={"study": "live"}).json()
            seen.append((stamp, pts, hv))
            if done:
                break
            time.sleep(0.05)
    except Exception as e:  # noqa: BLE001 - reported by the test in the main thread
        errors.append(e)
    finally:
        if store is not None:
            store.close()


def test_api_follows_a_running_search(url: str, tmp_path: Path) -> None:
    seen: list = []
    errors: list = []
    stop = threading.Event()
    t = threading.Thread(target=_reader, args=(url, seen, stop, errors), daemon=True)
    t.start()
    try:
        run_search(tmp_path, url, "live", "nsga2", budget=14, delay=0.03)  # the run needs the main thread
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    # it watched the study grow: several states, complete counts never going back
    complete = [s[0]["counts"].get("complete", 0) for s in seen]
    assert len(set(complete)) >= 3 and complete == sorted(complete)
    for stamp, pts, hv in seen:  # points and series are read after the stamp: never behind it
        assert pts["state"].count("complete") >= stamp["counts"].get("complete", 0)
        ev, val = hv["evaluations"], hv["value"]  # the points where the hypervolume changed, and the last
        assert ev == sorted(set(ev)) and all(a < b for a, b in zip(val[:-2], val[1:-1], strict=True))
    # the final answers agree with the store
    store = Store(url, read_only=True)
    try:
        view = StudyView(store)
        client = TestClient(create_app(store))
        pts = client.get("/api/points", params={"study": "live"}).json()
        complete_rows = view.candidates("live", "complete")
        assert pts["scored"] == len(complete_rows)
        assert pts["number"] == [c.number for c in view.candidates("live")]
        on_front = [n for n, f in zip(pts["number"], pts["front"], strict=True) if f]
        assert on_front == [c.number for c in view.front("live")]
        assert pts["report"] == ["held"]
        hv = client.get("/api/hypervolume", params={"study": "live"}).json()
        assert hv["value"][-1] == pytest.approx(view.hypervolume("live"))
        series = view.hypervolume_series("live")
        assert hv["evaluations"][-1] == view.summary("live").done == len(series)
        changed = [p["evaluations"] for i, p in enumerate(series) if i == 0 or p["value"] != series[i - 1]["value"]]
        assert hv["evaluations"][:-1] == changed[: len(hv["evaluations"]) - 1]
        s = client.get("/api/study", params={"study": "live"}).json()
        assert s["state"] == "done" and s["algorithm"] == "nsga2" and len(s["objectives"]) == 3
        rows = client.get("/api/studies").json()
        assert [r["study"] for r in rows] == ["live"] and rows[0]["best"] == view.best("live")
        front = view.front("live")[0]
        c = client.get("/api/candidate", params={"study": "live", "number": front.number}).json()
        assert c["scores"] == {k: v for k, v in front.scores.items() if k in ("a", "b", "c")}
        assert c["report_scores"] == {"held": front.scores["held"]}
        assert c["genome"]["kind"] == "parameter_space" and c["genome"]["weights"]
        n = front.number
        assert c["export_command"] == f"evomerge export live --candidate {n} --out merged-live-{n}"
        assert c["mergekit_yaml"] and "merge_method: ties" in c["mergekit_yaml"]
        # lineage in candidate numbers (the run stores parents as the algorithm's proposal keys)
        cands = view.candidates("live")
        by_key = {c.proposal_key: c.number for c in cands}
        child = next(x for x in cands if x.parents and x.state == "complete")  # NSGA-II generation 2
        got = client.get("/api/candidate", params={"study": "live", "number": child.number}).json()
        assert got["parents"] == [by_key[str(k)] for k in child.parents] and got["samples"]
        for p in got["parents"]:
            parent = client.get("/api/candidate", params={"study": "live", "number": p}).json()
            assert child.number in parent["children"]
        assert client.get("/api/study", params={"study": "nope"}).status_code == 404
        assert client.get("/api/candidate", params={"study": "live", "number": 999}).status_code == 404
    finally:
        store.close()


def test_read_only_get_only_and_assets_confined(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ro.db'}"
    run_search(tmp_path, url, "s", "random", budget=6)
    store = Store(url, read_only=True)
    writes: list[str] = []
    event.listen(store.db.engine, "before_cursor_execute",
                 lambda conn, cur, stmt, *a: writes.append(stmt) if stmt.split()[0].upper() in
                 ("INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER") else None)
    client = TestClient(create_app(store))
    for path in ("/", "/study?name=s", "/candidate?study=s&n=1", "/compare", "/api", "/static/common.js",
                 "/static/plotly.min.js", "/api/openapi.json", "/api/studies"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["cache-control"] == ("no-store" if path.startswith("/api/") else "no-cache")
    for study_api in ("study", "points", "hypervolume", "algorithm", "stamp", "events"):
        assert client.get(f"/api/{study_api}", params={"study": "s"}).status_code == 200
    plotly = client.get("/static/plotly.min.js")
    assert plotly.text.startswith("/*! plotly.js") and "scattergl" in plotly.text  # the package's own bundle
    etag = plotly.headers["etag"]
    assert client.get("/static/plotly.min.js", headers={"if-none-match": etag}).status_code == 304
    assert client.get("/api/candidate", params={"study": "s", "number": 1}).status_code == 200
    assert writes == []
    for path in ("/api/studies", "/api/points?study=s", "/"):
        assert client.post(path).status_code == 405 and client.delete(path).status_code == 405
    for bad in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static//etc/passwd",
                "/static/%2e%2e/%2e%2e/store/models.py", "/static/%2fetc%2fpasswd"):
        r = client.get(bad)
        assert r.status_code == 404 and b"import" not in r.content, bad
    paths = client.get("/api/openapi.json").json()["paths"]
    assert {"/api/studies", "/api/points", "/api/candidate", "/api/hypervolume", "/api/events"} <= set(paths)
    assert all(set(ops) == {"get"} for ops in paths.values())
    store.close()


def test_events_api_lists_a_lost_node(url: str) -> None:
    with Store(url) as st:
        st.create_study("s", "models: {}\n", [{"name": "a", "direction": "maximize"}], 4)
        for i in range(3):
            st.add_study_event("s", "node_lost", f"node 10.0.0.{i}:1 (ab) lost; {2 - i} node(s) left")
        st.add_study_event("s", "workers_back", "all 4 workers are running again")
    with Store(url, read_only=True) as store:
        client = TestClient(create_app(store))
        got = client.get("/api/events", params={"study": "s"}).json()["events"]
        assert [e["kind"] for e in got] == ["node_lost"] * 3 + ["workers_back"]
        assert got[0]["message"] == "node 10.0.0.0:1 (ab) lost; 2 node(s) left" and got[0]["time"].endswith("+00:00")
        newest = client.get("/api/events", params={"study": "s", "limit": 2}).json()["events"]
        assert [e["message"] for e in newest] == [got[2]["message"], got[3]["message"]]
        assert client.get("/api/events", params={"study": "nope"}).status_code == 404
        assert client.get("/api/events", params={"study": "s", "limit": 0}).status_code == 422


def test_front_mask_matches_the_front_module() -> None:
    rng = np.random.default_rng(0)
    for n, m in ((1, 2), (50, 2), (300, 3), (200, 4)):
        F = rng.integers(0, 6, size=(n, m)).astype(float)  # ties and duplicates included
        assert (front_mask(F) == non_dominated(F)).all()


def test_points_agree_with_the_stored_rows(url: str) -> None:
    """Every column of the points answer against the candidates' own rows: times to the millisecond,
    errors of failed candidates only, a score missing where a candidate has none."""
    store = Store(url)
    objs = [{"name": "a", "direction": "maximize"}, {"name": "b", "direction": "minimize"}]
    store.create_study("p", "algorithm: {name: random}\n", objs, 8)
    states = ["complete", "complete", "complete", "failed", "running", "queued", "complete", "complete"]
    for i, state in enumerate(states):
        n = store.add_candidate("p", proposal_key=str(i), genome=[0.1 * i], recipe_json={"i": i}, recipe_hash=f"h{i}")
        if state == "queued":
            continue
        store.mark_running("p", n, worker=f"w{i % 2}")
        time.sleep(0.002)
        if state == "failed":
            store.fail_candidate("p", n, "RuntimeError: <b>boom</b> " + "x" * 500)
        elif state == "complete":
            scores = {"a": 0.1 * i, "b": 1.0 - 0.1 * i, "held": 0.5} if i != 2 else {"a": 0.9}  # 2 misses b
            store.complete_candidate("p", n, scores, None, {"estimated": 1.0} if i == 7 else {})
    reader = Store(url, read_only=True)
    pts = TestClient(create_app(reader)).get("/api/points", params={"study": "p"}).json()
    reader.close()
    created = store.get_study("p").created
    rows = store.candidates("p")
    assert pts["number"] == [c.number for c in rows] and pts["state"] == states
    assert pts["scored"] == 4 and pts["report"] == ["held"] and set(pts["scores"]) == {"a", "b", "held"}
    for i, c in enumerate(rows):
        assert (pts["worker"][i], pts["attempts"][i]) == (c.worker, c.attempts)
        for key, t in (("start_s", c.started), ("end_s", c.finished)):
            assert pts[key][i] == (None if t is None else pytest.approx((t - created).total_seconds(), abs=2e-3))
        assert pts["error"][i] == (c.error[:300] if c.state == "failed" else None)
        assert {k: v[i] for k, v in pts["scores"].items() if v[i] is not None} == c.scores
    store.close()
    # a, b: (0.0, 1.0), (0.1, 0.9), (0.6, 0.4) scored; the last dominates the others; (0.7, 0.3) would
    # dominate it, but it is an anchor estimate: drawn, never on the front
    assert pts["front"] == [False, False, False, False, False, False, True, False]


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from evomerge.cli import main; main()", "dashboard", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_the_command_binds_this_host_by_default_and_warns_otherwise(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    Store(url).close()
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = _cli("--storage", url, "--host", host, "--port", str(port))
        try:
            lines = [proc.stderr.readline() for _ in range(2)]
            assert f"on http://{host}:{port}/" in lines[0] and "(read-only)" in lines[0]
            assert lines[1].startswith("warning: listening on 0.0.0.0") == warned
            assert warned or "this machine only (127.0.0.1)" in lines[1]
            for _ in range(100):
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/api/studies", timeout=2)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            assert r.status_code == 200 and r.json() == []
        finally:
            proc.terminate()
            proc.wait(20)
    for bad in (["--storage", f"sqlite:///{tmp_path / 'missing.db'}"], ["--storage", "nosuch://x"]):
        p = _cli(*bad)
        out, errtext = p.communicate(timeout=60)
        assert p.returncode == 2 and errtext.startswith("error: ") and len(errtext.strip().splitlines()) == 1, errtext


def test_a_data_flow_candidate_shows_its_layer_path(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'df.db'}")
    store.create_study("df", "genome: {type: data_flow}\nalgorithm: {name: random}\n",
                       [{"name": "a", "direction": "maximize"}, {"name": "cost", "direction": "minimize"}], 3)
    recipe = {"kind": "data_flow", "version": 1, "models": ["zoo://base", "zoo://math"], "num_layers": [4, 4],
              "path": [[0, 0], [1, 1], [1, 2], [0, 3]], "scales": [1.0, 0.8, 1.2, 1.0],
              "embed_source": 0, "head_source": 0}
    n = store.add_candidate("df", proposal_key="0", genome=[0.1], recipe_json=recipe, recipe_hash="h0")
    store.mark_running("df", n, worker="w")
    store.complete_candidate("df", n, {"a": 0.5, "cost": 2.0}, None, {})
    client = TestClient(create_app(store))
    c = client.get("/api/candidate", params={"study": "df", "number": n}).json()
    assert c["genome"] == {"kind": "data_flow", "models": recipe["models"], "path": recipe["path"],
                           "scales": recipe["scales"]}
    assert c["mergekit_yaml"] is None and "data-flow" in c["mergekit_missing"]
    s = client.get("/api/study", params={"study": "df"}).json()
    assert (s["genome"], s["algorithm"], s["hypervolume"]) == ("data_flow", "random", None)
    store.close()
