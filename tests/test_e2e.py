"""The user's path end to end, through the real `evomerge` command: search on Ray, status, front,
export, Ctrl-C and kill -9 followed by resume, a second driver refused, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
TASKS = ROOT / "search_spaces" / "demo_tasks"

pytestmark = pytest.mark.slow


def env_for(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        HF_HOME=str(tmp / "hf"),
        EVOMERGE_ZOO_DIR=str(tmp / "no-zoo-needed"),
        PYTHONUNBUFFERED="1",
    )
    return env


def space_file(tmp: Path, zoo: Path, budget: int, algorithm: str = "nsga2", *, settings: str = "{pop_size: 4}",
               method: str = "dare_ties", limit: int = 16, evaluation: str = "", seed: int = 3) -> Path:
    """A two-objective space over ``zoo``; ``evaluation`` adds entries to the evaluation mapping."""
    p = tmp / "space.yaml"
    p.write_text(
        f"""
base_model: {zoo / "base"}
models: [{zoo / "arith"}, {zoo / "script"}]
genome: {{method: {method}, layer_groups: 2}}
objectives:
  - {{name: arith, task: demo_arith_search, metric: "exact_match,none", limit: {limit}}}
  - {{name: script, task: demo_script_search, metric: "exact_match,none", limit: {limit}}}
algorithm: {{name: {algorithm}, settings: {settings}}}
evaluation: {{batch_size: {limit}, task_paths: [{TASKS}]{evaluation}}}
budget: {budget}
seed: {seed}
"""
    )
    return p


def run(args: list[str], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(EVOMERGE + args, cwd=tmp, env=env_for(tmp), capture_output=True, text=True,
                          timeout=timeout)


def status(tmp: Path, db: str) -> dict:
    r = run(["status", "--json", "--storage", db], tmp)
    assert r.returncode == 0, r.stderr
    return {s["study"]: s for s in json.loads(r.stdout)}


def complete_rows(dbfile: Path) -> dict[int, tuple]:
    con = sqlite3.connect(dbfile)
    try:
        rows = con.execute(
            "select number, attempts, finished from candidates where state = 'complete'"
        ).fetchall()
    finally:
        con.close()
    return {n: (a, f) for n, a, f in rows}


def wait_for_complete(dbfile: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the search ended before it could be interrupted"
        if dbfile.exists():
            try:
                if len(complete_rows(dbfile)) >= n:
                    return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} candidates completed in {timeout}s")


def test_search_status_front_export(short_zoo: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'e.db'}"
    sp = space_file(tmp_path, short_zoo, budget=8)
    r = run(["search", "--space", str(sp), "--workers", "2", "--storage", db, "--study", "s1",
             "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Pareto front of s1" in r.stdout
    # piped: one timestamped line per event, saying what the search waited for
    assert re.search(r"^\S+ \S+ ray: local Ray cluster up in", r.stderr, flags=re.M), r.stderr[-3000:]
    assert re.search(r"^\S+ \S+ worker: worker \d ready in", r.stderr, flags=re.M), r.stderr[-3000:]
    assert "next: evomerge export s1 --candidate" in r.stdout
    st = status(tmp_path, db)["s1"]
    assert st["state"] == "done"
    assert st["complete"] + st["failed"] == st["budget"] == 8
    assert st["running"] == 0
    con = sqlite3.connect(tmp_path / "e.db")  # attempts count evaluations on workers: cache hits have none
    evaluated = con.execute("select count(*) from candidates where worker != 'cache'").fetchone()[0]
    con.close()
    assert st["attempts"] >= evaluated >= 1

    fr = run(["front", "s1", "--json", "--storage", db], tmp_path)
    assert fr.returncode == 0
    front = json.loads(fr.stdout)
    assert front
    best = front[0]

    out = tmp_path / "export"
    ex = run(["export", "s1", "--candidate", str(best["candidate"]), "--out", str(out), "--storage", db], tmp_path)
    assert ex.returncode == 0, ex.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert json.loads((out / "recipe.json").read_text())["method"] == "dare_ties" and "recipe" in card.lower()
    assert "## How it was found" in card and "budget 8 candidates" in card

    # The exported folder loads with transformers and scores exactly what the search recorded.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.objectives import Evaluator
    from evomerge.space import load_space

    space = load_space(sp)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ev = Evaluator(space.objectives, [str(TASKS)], tok, space.evaluation.batch_size)
    got = ev.evaluate(model)
    for name, value in best["scores"].items():
        assert got[name].value == pytest.approx(value, abs=1e-12)

    # A second export into the same (now non-empty) folder is refused without touching it.
    again = run(["export", "s1", "--candidate", str(best["candidate"]), "--out", str(out), "--storage", db], tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr


def test_interrupt_kill_and_resume(short_zoo: Path, tmp_path: Path) -> None:
    dbfile = tmp_path / "r.db"
    db = f"sqlite:///{dbfile}"
    # large enough that the search cannot finish between the poll that sees 2 results and the signal
    # (a candidate takes ~0.1 s on the tiny zoo; 12 once finished first on a quiet machine)
    budget = 40
    sp = space_file(tmp_path, short_zoo, budget=budget)
    args = ["search", "--space", str(sp), "--workers", "2", "--storage", db, "--study", "r", "--no-progress"]

    # Ctrl-C: the driver stops cleanly and says how to go on.
    p = subprocess.Popen(EVOMERGE + args, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for_complete(dbfile, 2, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "evomerge resume r" in err
    before = complete_rows(dbfile)
    assert 2 <= len(before) < budget
    assert status(tmp_path, db)["r"]["state"] == "paused"  # Ctrl-C is a pause

    # kill -9 of the driver in the middle of the resumed run: no cleanup at all.
    p = subprocess.Popen(EVOMERGE + ["resume", "r", "--workers", "2", "--storage", db, "--no-progress"],
                         cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for_complete(dbfile, len(before) + 2, p)
    p.kill()
    p.wait(timeout=60)
    mid = complete_rows(dbfile)
    assert status(tmp_path, db)["r"]["state"] == "interrupted"  # its holder is gone: no need to wait 60 s

    r = run(["resume", "r", "--workers", "2", "--storage", db, "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    after = complete_rows(dbfile)
    st = status(tmp_path, db)["r"]
    assert st["complete"] + st["failed"] == budget and st["state"] == "done"
    con = sqlite3.connect(dbfile)
    assert con.execute("select count(*) from candidates").fetchone()[0] == budget
    con.close()
    # No completed candidate was evaluated again: same attempts, same finish time.
    for n, row in {**before, **mid}.items():
        assert after[n] == row


def test_second_driver_is_refused(short_zoo: Path, tmp_path: Path) -> None:
    from evomerge.space import dump_space, load_space
    from evomerge.store import Store

    db = f"sqlite:///{tmp_path / 'l.db'}"
    sp = load_space(space_file(tmp_path, short_zoo, budget=4))
    store = Store(db)
    store.create_study("busy", space_yaml=dump_space(sp), objectives=[{"name": "arith", "direction": "maximize"},
                       {"name": "script", "direction": "maximize"}], budget=4)
    store.acquire_lease("busy", f"otherhost:{os.getpid()}:x", 600)
    r = run(["resume", "busy", "--storage", db, "--no-progress"], tmp_path)
    assert r.returncode == 2
    assert "otherhost" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: b\nmodels: [a]\nobjectives: []\n")
    for args in (["validate", "--space", str(bad)], ["search", "--space", str(bad)],
                 ["front", "nope", "--storage", f"sqlite:///{tmp_path / 'x.db'}"],
                 ["status", "--storage", "notaurl://"]):
        r = run(args, tmp_path, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    r = run(["validate", "--space", str(bad)], tmp_path)
    assert "objectives" in r.stderr
    # An algorithm setting that does not exist is caught before a study is created.
    typo = tmp_path / "typo.yaml"
    typo.write_text("base_model: org/base\nmodels: [org/a]\ngenome: {num_layers: 2}\n"
                    "objectives: [{name: x, kind: cost, measure: params}]\n"
                    "algorithm: {name: nsga2, settings: {pop_sise: 4}}\n")
    r = run(["validate", "--space", str(typo)], tmp_path)
    assert r.returncode == 2 and "algorithm.settings" in r.stderr and "pop_sise" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# Every shipped space, found rather than listed, so a new one is checked too; one that builds on a stored
# study (demo_ps_dfs.yaml) needs that study first and has its own test (test_ps_dfs.py).
SHIPPED_SPACES = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml")
                        if "study://" not in p.read_text(encoding="utf-8"))


def test_the_shipped_spaces_are_found() -> None:
    assert {"demo.yaml", "ja_math.yaml", "dfs_demo.yaml"} <= set(SHIPPED_SPACES)  # demo_ps_dfs needs a study


@pytest.mark.parametrize("name", SHIPPED_SPACES)
def test_validate_and_dry_run_shipped_spaces(name: str, tmp_path: Path) -> None:
    from evomerge.space import load_space

    space = ROOT / "search_spaces" / name
    loaded = load_space(space)
    assert loaded.name == space.stem and loaded.objectives
    r = run(["validate", "--space", str(space)], tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout
    r = run(["search", "--space", str(space), "--dry-run", "--workers", "8"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "genes" in r.stdout and "workers      8" in r.stdout
    if name == "ja_math.yaml":
        assert "= 204 genes" in r.stdout  # (32 blocks + embed + head) x 3 models x (weight, density)


def test_data_flow_search_and_export(short_zoo: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'd.db'}"
    sp = tmp_path / "dfs.yaml"
    sp.write_text(
        f"""
models: [{short_zoo / "arith"}, {short_zoo / "script"}]
genome: {{type: data_flow, repeats: 1, scales: per_layer}}
objectives:
  - {{name: arith, task: demo_arith_search, metric: "exact_match,none", limit: 8}}
  - {{name: path_length, kind: cost, measure: path_length, direction: minimize}}
algorithm: {{name: nsga2, settings: {{pop_size: 4}}}}
evaluation: {{batch_size: 8, task_paths: [{TASKS}]}}
budget: 6
seed: 1
"""
    )
    r = run(["search", "--space", str(sp), "--workers", "1", "--storage", db, "--study", "d", "--no-progress"],
            tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "path (" in r.stdout
    front = json.loads(run(["front", "d", "--json", "--storage", db], tmp_path).stdout)
    best = front[0]
    assert best["recipe"]["kind"] == "data_flow"
    assert best["scores"]["path_length"] == len(best["recipe"]["path"])
    out = tmp_path / "dfs_export"
    ex = run(["export", "d", "--candidate", str(best["candidate"]), "--out", str(out), "--storage", db], tmp_path)
    assert ex.returncode == 0, ex.stderr[-3000:]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.genomes import cost_measure
    from evomerge.objectives import Evaluator
    from evomerge.space import load_space

    space = load_space(sp)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    # The cost measures come from the genome kind, as a worker supplies them.
    ev = Evaluator(space.objectives, [str(TASKS)], AutoTokenizer.from_pretrained(out), space.evaluation.batch_size,
                   measure=cost_measure)
    got = ev.evaluate(model)
    for name, value in best["scores"].items():
        assert got[name].value == pytest.approx(value, abs=1e-12)


def test_search_on_postgresql(short_zoo: Path, tmp_path: Path, fresh_pg_url: str) -> None:
    """The cluster setting: the same search with the study in PostgreSQL, then a resume of a done study."""
    sp = space_file(tmp_path, short_zoo, budget=4, algorithm="random")
    r = run(["search", "--space", str(sp), "--workers", "2", "--storage", fresh_pg_url, "--study", "pg",
             "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    st = status(tmp_path, fresh_pg_url)["pg"]
    assert st["complete"] + st["failed"] == 4 and st["state"] == "done"
    again = run(["resume", "pg", "--storage", fresh_pg_url, "--no-progress"], tmp_path)
    assert again.returncode == 0 and "Pareto front of pg" in again.stdout
    assert status(tmp_path, fresh_pg_url)["pg"]["attempts"] == st["attempts"]


def test_map_with_anchor_estimates_keeps_a_fully_scored_front(short_zoo: Path, tmp_path: Path) -> None:
    """Cheaper fitness on the surrogate search (the setting docs/benchmarks.md measures): MAP's design and
    front rounds run on anchor estimates, most candidates are estimated, and every front member is scored
    on every example."""
    sp = space_file(tmp_path, short_zoo, budget=18, algorithm="map", method="task_arithmetic", limit=32, seed=1,
                    settings="{n_design: 10, n_front: 4, variant: diagonal, front_rounds: null}",
                    evaluation=", multi_fidelity: {method: anchors, fraction: 0.1, min_reference: 4, z: 0.5, "
                               "confirm: 0.3}")
    db = tmp_path / "m.db"
    r = run(["search", "--space", str(sp), "--workers", "1", "--storage", f"sqlite:///{db}", "--study", "m",
             "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    con = sqlite3.connect(db)
    try:
        rows = con.execute("select number, generation, timings from candidates where state = 'complete'").fetchall()
    finally:
        con.close()
    assert len(rows) == 18
    timings = {n: json.loads(t) for n, _, t in rows}
    estimated = {n for n, t in timings.items() if "estimated" in t}
    assert {g for _, g, _ in rows} >= {0, 1}  # the design and at least one front round
    assert estimated and len(estimated) < 18 - 4  # the first 4 are references, scored in full
    assert all(timings[n]["fidelity"] < 1.0 for n in estimated)
    fr = run(["front", "m", "--json", "--storage", f"sqlite:///{db}"], tmp_path)
    assert fr.returncode == 0, fr.stderr
    front = {c["candidate"] for c in json.loads(fr.stdout)}
    assert front and not front & estimated
    assert all(timings[n].get("fidelity", 1.0) == 1.0 for n in front)
