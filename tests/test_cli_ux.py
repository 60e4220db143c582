"""The command line as a user meets it: help, overrides, the front and status tables, the run's log.

Everything here runs in-process or on a store written by hand (no Ray, no model), in a few seconds.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from evomerge.cli import app, main
from evomerge.genomes import SpaceError
from evomerge.recipe import LayerGroup, Recipe
from evomerge.run.progress import EventLog, SearchProgress, resolve_log_format
from evomerge.space import apply_overrides, dump_space, load_space, parse_space_text, space_origin
from evomerge.store import Store
from evomerge.tables import format_column, load_front, print_front, status_rows, status_table
from evomerge.view import StudyView

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EVOMERGE, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={"COLUMNS": "100", "PATH": "/usr/bin:/bin", "HOME": str(cwd or ROOT),
                               "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------------------ help

def _commands() -> list[list[str]]:
    import typer.main

    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        subs = getattr(cmd, "commands", None)
        out += [[name, sub] for sub in subs] if subs else [[name]]
    return out


def test_every_option_shows_its_default_and_reads_cleanly() -> None:
    for args in [[], *_commands()]:
        r = cli(*args, "--help")
        assert r.returncode == 0, (args, r.stderr)
        text = r.stdout
        assert "<bool>" not in text and "{" not in text.split("\n", 1)[0], (args, text)
        assert "<str>" not in text, (args, text)  # every value has a metavar saying what it is
        # every option that takes a value says its default or that it is required
        blocks = re.split(r"\n(?=  -)", text.split("Options:", 1)[-1])
        for b in blocks:
            b = b.strip()
            opt = b.split()[0] if b else ""
            if not opt.startswith("--") or opt in ("--help", "--install-completion", "--show-completion"):
                continue
            takes_value = len(b.split()) > 1 and re.match(r"--\S+ [A-Z][A-Z0-9_=:|a-z]*", b.replace("\n", " "))
            is_switch = " / --" in b.split("\n")[0] or not takes_value
            if not is_switch:
                assert "[default:" in b or "[required]" in b, (args, b)


def test_usage_names_arguments_in_capitals() -> None:
    r = cli("front", "--help")
    assert r.stdout.startswith("Usage: evomerge front [OPTIONS] STUDY"), r.stdout
    assert "--storage URL" in r.stdout and "sqlite:///evomerge.db" in r.stdout


def test_shell_completion_installs_and_completes(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHELL": "/bin/bash", "PYTHONPATH": str(ROOT)}
    # from a bash, as a user types it: the shell is detected from the calling process
    r = subprocess.run(["/bin/bash", "-c", shlex.join([*EVOMERGE, "--install-completion"]) + "; exit $?"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "evomerge" in (tmp_path / ".bashrc").read_text()  # the rc file sources the script it wrote
    for words, cword, want in (("evomerge fr", 1, "front"), ("evomerge search --wo", 2, "--workers")):
        r = subprocess.run(EVOMERGE, capture_output=True, text=True, timeout=120,
                           env={**env, "_EVOMERGE_COMPLETE": "complete_bash", "COMP_WORDS": words,
                                "COMP_CWORD": str(cword)})
        assert r.returncode == 0 and want in r.stdout.split(), (words, r.stdout, r.stderr)


# ------------------------------------------------------------------------------------- overrides

def test_overrides_set_dotted_paths_and_are_validated() -> None:
    data = yaml.safe_load(DEMO.read_text())
    new = apply_overrides(data, ["budget=8", "algorithm.settings.n_front=4", "objectives.0.limit=20",
                                 "genome.weight_bounds=[0, 1]"])
    assert new["budget"] == 8 and new["algorithm"]["settings"]["n_front"] == 4
    assert new["objectives"][0]["limit"] == 20 and new["genome"]["weight_bounds"] == [0, 1]
    assert data == yaml.safe_load(DEMO.read_text())  # the input is left alone
    sp = load_space(DEMO, ["budget=8", "seed=3", "algorithm.settings.n_front=4"])
    assert (sp.budget, sp.seed, sp.algorithm.settings["n_front"]) == (8, 3, 4)
    for bad, where in (("budget=abc", "field 'budget'"), ("objectives.9.limit=1", "objectives.9"),
                       ("nokey", "KEY=VALUE"), ("budget.x=1", "not a mapping"), ("bogus=1", "field 'bogus'")):
        with pytest.raises(SpaceError, match=re.escape(where)) as e:
            load_space(DEMO, [bad])
        assert "\n" not in str(e.value)


def test_overrides_are_recorded_with_the_stored_space() -> None:
    sp = load_space(DEMO, ["budget=8"])
    text = dump_space(sp, DEMO, ["budget=8"])
    assert parse_space_text(text).budget == 8  # what `resume` reads
    origin = space_origin(text)
    assert origin["overrides"] == ["budget=8"] and origin["file"] == str(DEMO.resolve())
    assert origin["names"][sp.models[0]] == sp.models[0] == "zoo://v3/arith"
    assert space_origin("budget: 3\n") == {}


def test_bad_override_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    r = cli("search", "--space", str(DEMO), "--set", "algorithm.settings=7", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "algorithm.settings" in r.stderr
    r = cli("search", "--space", str(DEMO), "--budget", "7", "--seed", "5", "--set",
            "algorithm.settings.n_front=4", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "7 candidates, seed 5" in r.stdout and '"n_front": 4' in r.stdout
    r = cli("search", "--space", str(DEMO), "--set", "algorithm.settings.bogus=4", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "bogus" in r.stderr, r.stderr


def test_a_log_line_is_not_broken_when_stderr_is_a_file() -> None:
    # rich's default for a file is 80 columns with hard breaks: `evomerge zoo build 2> build.log` split its
    # 89-character reference line in two
    line = "zoo: " + " ".join(["word"] * 30)
    code = f"from evomerge.cli import err; err.print({line!r}, markup=False, highlight=False)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stderr == line + "\n", r.stderr


# ---------------------------------------------------------------------------------- the tables

def _recipe(w: float) -> Recipe:
    return Recipe(base="zoo://base", sources=["zoo://arith", "zoo://script"], method="task_arithmetic",
                  groups=[LayerGroup(name="embed", kind="embed", weights=[w, 1 - w]),
                          *(LayerGroup(name=f"layers.{i}", kind="blocks", start=i, stop=i + 1, weights=[w, 0.5])
                            for i in range(8))])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    space = load_space(DEMO, ["budget=10"])
    # the space's objectives plus a cost; the report in the space's own order (not alphabetical)
    objectives = [{"name": "arith", "direction": "maximize"}, {"name": "params", "direction": "minimize"}]
    st = Store(f"sqlite:///{tmp_path / 'f.db'}")
    st.create_study("s", dump_space(space, DEMO, ["budget=10"]), objectives, budget=10)
    rows = [(0.5, 1503744.0), (0.5, 1503744.0), (0.7, 2000000.0), (0.1, 3000000.0)]
    for i, (acc, params) in enumerate(rows):
        r = _recipe(0.1 * (i + 1))
        n = st.add_candidate("s", proposal_key=str(i), genome=[0.5], recipe_json=r.canonical_json(),
                             recipe_hash=r.hash())
        st.complete_candidate("s", n, {"arith": acc, "params": params})
        if i < 3:
            st.add_scores("s", n, {"script_test": 0.25, "arith_test": 0.5, "cross_test": 0.0})
    return st


def _render(store: Store, width: int, wide: bool = False) -> str:
    buf = io.StringIO()
    print_front(load_front(StudyView(store), "s"), Console(file=buf, width=width, soft_wrap=True), wide=wide,
                storage="sqlite:///f.db")
    return buf.getvalue()


def test_front_table_reads_at_100_columns(store: Store) -> None:
    text = _render(store, 100)
    lines = text.splitlines()
    table = [ln for ln in lines if re.match(r"\s*\d", ln)]
    assert all(len(ln.rstrip()) <= 100 for ln in table + lines[:4]), text
    assert "3 candidates (4 complete of budget 10)" in lines[0]  # candidate 4 is dominated
    header = next(ln for ln in lines if "arith" in ln and "#" in ln)
    order = [header.index(k) for k in ("arith", "params", "arith_test*", "script_test*", "cross_test*")]
    assert order == sorted(order), header  # search objectives, then held out in the space's order
    assert "1503744" in text and "1503744.0" not in text  # integers as integers
    assert "0.5000" in text and "0.0000" in text  # accuracies (even all zero) in decimals
    assert re.search(r"^\s*1 \+1\s", text, flags=re.M), text  # the duplicate merged into candidate 1
    assert "+N: N more candidates with exactly the same scores, shown once (1: 2)" in text
    assert "recipe: task_arithmetic" in text and "sources: 0 zoo://arith, 1 zoo://script, base zoo://base" in text
    assert lines[-1] == "next: evomerge export s --candidate 3 --out DIR --storage sqlite:///f.db"
    wide = _render(store, 10_000, wide=True)  # what `front --wide` gets: no width limit
    assert "L7 0.30/0.50" in wide and _recipe(0.3).hash() in wide  # --wide: the whole recipe and its hash


def test_format_column() -> None:
    assert format_column([11.0, 3.0, None]) == ["11", "3", "-"]
    assert format_column([0.0, 1.0]) == ["0.0000", "1.0000"]
    assert format_column([0.25, 7.0]) == ["0.2500", "7.0000"]


def test_status_shows_best_per_objective_and_elapsed(store: Store) -> None:
    rows = status_rows(StudyView(store))
    assert rows[0]["best"] == {"arith": 0.7, "params": 1503744.0} and rows[0]["elapsed_s"] >= 0
    buf = io.StringIO()
    Console(file=buf, width=100).print(status_table(rows))
    assert "arith 0.7, params 1503744" in buf.getvalue() and "4/10" in buf.getvalue()


def test_status_shows_the_lost_nodes_that_matter(store: Store, tmp_path: Path, monkeypatch, capsys) -> None:
    lost = "node 127.0.0.1:{} (3cb8d965) lost; {} node(s) left; its workers are replaced where the cluster " \
           "has room, the search goes on meanwhile"
    store.add_study_event("s", "node_lost", lost.format(40001, 3))
    store.add_study_event("s", "workers_back", "all 4 workers are running again")  # an earlier loss, over
    store.add_study_event("s", "node_lost", lost.format(33883, 2))
    store.add_study_event("s", "node_lost", lost.format(33999, 1))

    def status(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["evomerge", "status", "--storage", f"sqlite:///{tmp_path / 'f.db'}", *args])
        main()
        return capsys.readouterr().out

    text = status()
    news = text.split("cluster events:\n", 1)[1].splitlines()
    assert [ln.split("  ")[-1] for ln in news] == ["node 127.0.0.1:33883 (3cb8d965) lost; 2 node(s) left",
                                                   "node 127.0.0.1:33999 (3cb8d965) lost; 1 node(s) left"]
    assert all(ln.startswith("  s  ") and len(ln) <= 100 for ln in news), news
    store.add_study_event("s", "workers_back", "all 4 workers are running again")
    assert status().splitlines()[-1].endswith("  all 4 workers are running again")
    events = json.loads(status("--json"))[0]["events"]
    assert [e["kind"] for e in events] == ["node_lost", "workers_back", "node_lost", "node_lost", "workers_back"]
    assert events[2]["message"] == lost.format(33883, 2)  # the whole line the run printed


# ---------------------------------------------------------------------------------- the run's log

def test_log_formats(store: Store) -> None:
    assert resolve_log_format("auto", io.StringIO()) == "plain"  # not a terminal
    with pytest.raises(ValueError):
        resolve_log_format("xml")
    buf = io.StringIO()
    log = EventLog("json", stream=buf)
    log.event("ray", "joined the Ray cluster at 10.0.0.1:6379: 3 node(s)", nodes=3)
    event = json.loads(buf.getvalue())
    assert event["event"] == "ray" and event["nodes"] == 3 and event["time"]
    plain = io.StringIO()
    progress = SearchProgress(StudyView(store), "s", 10, log=EventLog("plain", stream=plain))
    with progress:
        progress.update()  # no change since the last line: nothing new
    lines = plain.getvalue().splitlines()
    assert len(lines) == 1 and "progress: 4/10 done | best arith 0.7, params 1.5e+06" in lines[0], lines
    EventLog("plain", stream=plain).event("worker", "x" * 300)
    assert plain.getvalue().splitlines()[1].endswith("x" * 300)  # one line, never cut to a width


def test_mergekit_config_names_sources_relative_to_a_stated_folder(tmp_path: Path) -> None:
    from evomerge.genomes import ExportCard
    from evomerge.genomes.parameter_space.export import portable_names

    for d in ("models/base", "models/a", "elsewhere/b"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "spaces").mkdir()
    r = Recipe(base=str(tmp_path / "models/base"), sources=[str(tmp_path / "models/a"), str(tmp_path / "elsewhere/b")],
               method="linear", groups=[LayerGroup(name="embed", kind="embed", weights=[0.5, 0.5])])
    card = ExportCard("s", 1, {}, [], found={"file": str(tmp_path / "spaces" / "space.yaml")})
    names, root = portable_names(r, card)
    assert root == str(tmp_path / "spaces")
    assert names[str(tmp_path / "models/a")] == "../models/a"
    assert names[str(tmp_path / "elsewhere/b")] == "../elsewhere/b"
    assert all((Path(root) / n).is_dir() for n in names.values())
    hub = r.model_copy(update={"sources": ["org/model-a", "org/model-b"], "base": "org/base"})
    assert portable_names(hub, card) == ({}, None)  # hub ids stay as they are: no folder to state


def test_a_wait_on_another_builders_lock_is_announced(tmp_path: Path) -> None:
    import threading

    from evomerge.cache import file_lock

    lock = tmp_path / ".zoo.lock"
    said: list[str] = []
    got = threading.Event()

    def second() -> None:
        with file_lock(lock, on_wait=lambda: said.append("waiting")):
            got.set()

    with file_lock(lock, on_wait=lambda: said.append("first waited")):
        t = threading.Thread(target=second)
        t.start()
        assert not got.wait(0.5)  # blocked behind the holder, after saying so
        assert said == ["waiting"]
    t.join(10)
    assert got.is_set() and said == ["waiting"]
