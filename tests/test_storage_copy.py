"""`evomerge storage copy`: studies moved between SQLite and PostgreSQL with every row, refused names,
all or nothing, and a copied study that resumes exactly as the original."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from fixtures_models import make_tiny_llama_family, placeholder_tasks

from evomerge.cli import main
from evomerge.run import InProcessPool, StudyRun
from evomerge.space import dump_space, load_space
from evomerge.store import Store
from evomerge.store import copy as copy_mod
from evomerge.store.copy import CopyRefused, copy_studies
from evomerge.store.leases import owner_id
from evomerge.view import StudyView

OBJ = [{"name": "a", "direction": "maximize"}, {"name": "b", "direction": "minimize"}]
CLI = [sys.executable, "-c", "from evomerge.cli import main; main()"]


def dump(url: str) -> dict[str, list[tuple]]:
    """Every row of every table, ids replaced by what they stand for (study name, candidate number)."""
    eng = sa.create_engine(url)
    md = sa.MetaData()
    md.reflect(eng)
    out: dict[str, list[tuple]] = {}
    try:
        with eng.connect() as c:
            studies = {r.id: r.name for r in c.execute(sa.text("SELECT id, name FROM studies"))}
            cands = {r.id: (studies[r.study_id], r.number)
                     for r in c.execute(sa.text("SELECT id, study_id, number FROM candidates"))}
            for name, table in md.tables.items():
                if name == "alembic_version":
                    continue
                rows = []
                for r in c.execute(sa.select(table)):
                    m = dict(r._mapping)
                    m.pop("id")
                    if "study_id" in m:
                        m["study_id"] = studies[m["study_id"]]
                    if "candidate_id" in m:
                        m["candidate_id"] = cands[m["candidate_id"]]
                    if isinstance(m.get("data"), memoryview):
                        m["data"] = bytes(m["data"])
                    rows.append(tuple(sorted((k, repr(v)) for k, v in m.items())))
                out[name] = sorted(rows)
    finally:
        eng.dispose()
    return out


def _fill(url: str) -> None:
    """Two studies with candidates in every state, scores, per-example scores, checkpoints, a hypervolume
    series, events and a held lease."""
    with Store(url) as st:
        for name in ("alpha", "beta"):
            st.create_study(name, f"name: {name}\n", OBJ, budget=9, reference_point=[0.0, 2.5])
            for i in range(6):
                n = st.add_candidate(name, f"k{i}", [i / 7, 1 - i / 7, 1 / 3], {"w": [i, 0.1]}, f"h{i % 4}",
                                     parents=[j for j in range(1, i + 1) if j % 2], generation=i // 2,
                                     operator="ties", niche={"cell": [i, 1]} if i % 2 else None)
                if i < 4:
                    st.mark_running(name, n, worker=f"node{i}:{100 + i}:cuda")
                if i < 2:
                    st.complete_candidate(name, n, {"a": 0.1 * i + 1e-17, "b": math.pi * i},
                                          {"a": [0.0, 1.0, 0.5], "b": [1e-300, -0.0]},
                                          {"materialize_s": 0.25, "evaluate_s": 1.5}, attempt=True)
                elif i == 2:
                    st.fail_candidate(name, n, "RuntimeError: boom\n  at line 3", attempt=True)
            st.add_scores(name, 1, {"held": 0.75}, {"held": [1.0, 0.5]})
            for step in (3, 4, 5):
                st.save_checkpoint(name, step, "nsga2", {"step": step, "x": [math.nan, math.inf, 0.1]})
            st.add_hypervolume_points(name, [(1, 1, 0.125, None), (2, 2, 0.1 + 1e-17, None), (3, 2, 0.1, None)])
            st.add_study_event(name, "node_lost", f"node 127.0.0.1:1 ({name}) lost; 1 node(s) left")
            st.add_study_event(name, "workers_back", "all 4 workers are running again")
            st.set_study_status(name, "running")
        st.acquire_lease("alpha", owner_id(), 600)


def _no_lease(d: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    def clear(row: tuple) -> tuple:
        return tuple((k, "None" if k in ("lease_owner", "lease_expires") else v) for k, v in row)

    return {**d, "studies": sorted(clear(r) for r in d["studies"])}


def test_round_trip_sqlite_postgresql_sqlite_keeps_every_row(tmp_path: Path, fresh_pg_url: str) -> None:
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    _fill(a)
    there = copy_studies(a, fresh_pg_url)
    back = copy_studies(fresh_pg_url, b)
    assert [(c.name, c.candidates, c.scores, c.samples, c.checkpoints) for c in there] == \
        [("alpha", 6, 5, 5, 3), ("beta", 6, 5, 5, 3)]
    assert back == there
    original, pg, returned = dump(a), dump(fresh_pg_url), dump(b)
    assert {k: len(v) for k, v in original.items()} == \
        {"studies": 2, "candidates": 12, "scores": 10, "sample_scores": 10, "checkpoints": 6,
         "hypervolume_points": 6, "study_events": 4}
    # the held lease of alpha is not copied; every other value is, bit for bit
    assert any("None" not in dict(r)["lease_owner"] for r in original["studies"])
    assert pg == returned == _no_lease(original)
    with Store(b, read_only=True) as st:
        assert st.get_study("alpha").lease_owner is None
        assert st.sample_scores("alpha", 2) == {"a": [0.0, 1.0, 0.5], "b": [1e-300, -0.0]}
        assert math.isnan(st.latest_checkpoint("beta").state["x"][0])
        assert [e.kind for e in st.study_events("beta")] == ["node_lost", "workers_back"]  # in their order
        # running at the source, held by no driver here: interrupted until `resume` takes it
        assert {r["study"]: r["state"] for r in StudyView(st).studies()} == {"alpha": "interrupted",
                                                                              "beta": "interrupted"}


def test_one_study_under_another_name_and_refusals(tmp_path: Path) -> None:
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    _fill(a)
    copy_studies(a, b, study="beta")
    before = dump(b)
    with pytest.raises(CopyRefused, match="already holds 'beta'"):
        copy_studies(a, b)  # alpha is free, beta is not: nothing at all is copied
    assert dump(b) == before
    assert copy_studies(a, b, study="beta", rename="beta-2")[0].name == "beta-2"
    with Store(b, read_only=True) as st:
        assert [s["study"] for s in st.list_studies()] == ["beta", "beta-2"]
        assert [c.recipe_hash for c in st.candidates("beta-2")] == [c.recipe_hash for c in st.candidates("beta")]
    with pytest.raises(CopyRefused, match="--study"):
        copy_studies(a, b, rename="x")


@pytest.mark.parametrize("where", ["sqlite", "postgresql"])
def test_a_failed_copy_writes_nothing(tmp_path: Path, request, monkeypatch, where: str) -> None:
    a = f"sqlite:///{tmp_path / 'a.db'}"
    dst = f"sqlite:///{tmp_path / 'b.db'}" if where == "sqlite" else request.getfixturevalue("fresh_pg_url")
    _fill(a)
    real, calls = copy_mod.write_study, []

    def second_breaks(conn: Any, rows: Any, name: str) -> None:
        real(conn, rows, name)
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk gone")

    monkeypatch.setattr(copy_mod, "write_study", second_breaks)
    with pytest.raises(OSError):
        copy_studies(a, dst)
    assert calls == ["alpha", "beta"]  # both studies were written, in a transaction rolled back
    assert {k: v for k, v in dump(dst).items()} == \
        {"studies": [], "candidates": [], "scores": [], "sample_scores": [], "checkpoints": [],
         "hypervolume_points": [], "study_events": []}


def test_cli_copies_and_refuses_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    _fill(a)
    r = subprocess.run([*CLI, "storage", "copy", a, b, "--study", "alpha"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "copied alpha: 6 candidates, 5 scores, 5 per-example score rows, 3 checkpoints" in r.stdout

    def cli(*args: str) -> SimpleNamespace:  # the same entry point in this process: no start-up per case
        monkeypatch.setattr(sys, "argv", ["evomerge", "storage", "copy", *args])
        with pytest.raises(SystemExit) as e:
            main()
        got = capsys.readouterr()
        return SimpleNamespace(returncode=e.value.code, stdout=got.out, stderr=got.err)

    text = tmp_path / "notes.db"  # not a database: never written to, whichever side it is on
    text.write_text("not a database\n")
    for args, words in [((a, b, "--study", "alpha"), "already holds 'alpha'"),
                        ((a, b, "--study", "nope"), "no study named 'nope'"),
                        ((a, b, "--as", "x"), "needs the one study"),
                        ((a, "mysql://x/y"), "unsupported storage URL"),
                        ((f"sqlite:///{text}", b), "cannot open storage"),
                        ((a, f"sqlite:///{text}"), "cannot open storage")]:
        r = cli(*args)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and words in r.stderr and r.stderr.startswith("error: "), r.stderr
    assert text.read_text() == "not a database\n"
    assert sorted(p.name for p in tmp_path.glob("notes.db*")) == ["notes.db"]


# -- a copied study resumes as the original would ------------------------------------------------------

SPACE = """
base_model: {base}
models: [{e0}, {e1}]
genome: {{method: task_arithmetic, layer_groups: model}}
objectives:
  - {{name: a, task: t1, metric: "exact_match,none"}}
  - {{name: b, task: t2, metric: "exact_match,none"}}
algorithm: {{name: {algorithm}, settings: {settings}}}
evaluation: {{task_paths: [tasks]}}
budget: 10
"""


class HashWorker:
    """Scores a recipe by its text (deterministic, instant), per-example scores included."""

    def evaluate(self, number, recipe_json, objective_names=None, front=None, fidelity=None) -> dict:
        h = sum(recipe_json.encode()) % 997 / 997
        samples = {"a": [h, 1.0, 0.0, h], "b": [1.0 - h, 0.0, 1.0, 1.0 - h]}
        names = objective_names or list(samples)
        return {"number": number, "scores": {n: sum(samples[n]) / 4 for n in names},
                "samples": {n: samples[n] for n in names}, "timings": {"materialize_s": 0.0},
                "error": None, "worker": "hash"}


class StopsAfter(InProcessPool):
    """An in-process pool whose user presses Ctrl-C after ``n`` results, with tasks still in flight."""

    def __init__(self, n: int) -> None:
        super().__init__(HashWorker, workers=2)
        self.left = n

    def wait(self, timeout: float | None = None):
        if self.left <= 0:
            raise KeyboardInterrupt
        got = super().wait(timeout)
        self.left -= len(got)
        return got


def _outcome(url: str) -> tuple:
    with Store(url, read_only=True) as st:
        cands = [(c.number, c.proposal_key, c.genome, c.recipe_hash, c.parents, c.generation, c.state,
                  c.attempts, c.scores, st.sample_scores("s", c.number)) for c in st.candidates("s")]
        return cands, st.latest_checkpoint("s"), st.get_study("s").status


@pytest.mark.parametrize("algorithm,settings", [("nsga2", "{pop_size: 4}"), ("map", "{}")])
def test_a_copied_study_resumes_exactly_as_the_original(tmp_path: Path, fresh_pg_url: str, algorithm: str,
                                                         settings: str) -> None:
    base, experts = make_tiny_llama_family(tmp_path, n_experts=2, seed=0)
    placeholder_tasks(tmp_path, ("t1", "t2"))
    p = tmp_path / "s.yaml"
    p.write_text(SPACE.format(base=base, e0=experts[0], e1=experts[1], algorithm=algorithm, settings=settings))
    space = load_space(p)
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    with Store(a) as st:
        st.create_study("s", dump_space(space), OBJ[:1] + [{"name": "b", "direction": "maximize"}], budget=10)
        with pytest.raises(KeyboardInterrupt):
            StudyRun(space, st, "s", show_progress=False, pool=lambda cfg: StopsAfter(4)).run()
        counts = st.study_counts("s")
    assert counts["complete"] == 4 and counts["running"] == 2  # stopped with two candidates in flight
    copy_studies(a, fresh_pg_url)
    copy_studies(fresh_pg_url, b)
    for url in (a, fresh_pg_url, b):
        with Store(url) as st:
            StudyRun(space, st, "s", show_progress=False, pool=lambda cfg: InProcessPool(HashWorker, 2)).run()
    original = _outcome(a)
    assert original[2] == "done" and len(original[0]) == 10
    assert _outcome(fresh_pg_url) == original
    assert _outcome(b) == original
