"""Bad input never yields a traceback: any command, any input exits 0, or 2 with one `error: ` line,
and leaves nothing half-written (no study row, no output folder, no changed file).

(a) the corpus of malformed inputs found by hand, each through the real command in a subprocess;
(b) hypothesis properties: mutated spaces through `load_space`, argument vectors through `main()`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from fixtures_models import make_tiny_llama_family
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from evomerge.cli import main
from evomerge.genomes import SpaceError
from evomerge.space import SearchSpace, load_space
from evomerge.store import Store

ROOT = Path(__file__).resolve().parents[1]
EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
DEMO = ROOT / "search_spaces" / "demo.yaml"
TASKS = ROOT / "search_spaces" / "demo_tasks"


def demo_data() -> dict[str, Any]:
    data = yaml.safe_load(DEMO.read_text())
    data["evaluation"]["task_paths"] = [str(TASKS)]  # the copies live in temporary folders
    return data


def run_cli(args: list[str], cwd: Path, *, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """The command's exit code, stdout and stderr: through `python -m evomerge.cli` with ``subprocess_``,
    else through ``main()`` in this process (the same code path, without paying the imports per case)."""
    env = {"EVOMERGE_STORAGE": f"sqlite:///{cwd / 'default.db'}", "HF_HUB_OFFLINE": "1"}
    if subprocess_:
        return subprocess.run(EVOMERGE + args, cwd=cwd, env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=300)
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        with mock.patch.object(sys, "argv", ["evomerge", *args]), mock.patch.dict(os.environ, env), \
                redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code or 0
            except BaseException:  # what the interpreter would print: the test then fails showing it
                err.write(traceback.format_exc())
                code = 1
    finally:
        os.chdir(old_cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def study_rows(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        tables = {t for (t,) in con.execute("select name from sqlite_master where type = 'table'")}
        return con.execute("select count(*) from studies").fetchone()[0] if "studies" in tables else 0
    finally:
        con.close()


# ------------------------------------------------------------------------------------- the corpus

DEMO_YAML = yaml.safe_dump(demo_data(), sort_keys=False)
BUDGET = f"budget: {demo_data()['budget']}"

BAD_SPACES: dict[str, bytes] = {
    "not_utf8": DEMO_YAML.encode() + b"\n# caf\xe9\n",
    "utf16": DEMO_YAML.encode("utf-16"),
    "int_5000_digits": DEMO_YAML.replace("seed: 0", "seed: " + "1" * 5000).encode(),
    "budget_1e25": DEMO_YAML.replace(BUDGET, "budget: 10000000000000000000000000").encode(),
    "budget_2_31": DEMO_YAML.replace(BUDGET, f"budget: {2**31}").encode(),
    "seed_1e25": DEMO_YAML.replace("seed: 0", "seed: 10000000000000000000000000").encode(),
    "seed_negative": DEMO_YAML.replace("seed: 0", "seed: -5").encode(),  # numpy, optuna, pymoo: seeds >= 0
    "nested_too_deep": b"models: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "not_a_mapping": b"- just\n- a list\n",
    "not_yaml": b"models: [a\n",
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
@pytest.mark.parametrize("command", ["validate", "search"])
def test_bad_space_is_one_line_and_creates_no_study(case: str, command: str, tmp_path: Path) -> None:
    # a case whose edit no longer matches demo.yaml would run the whole demo search, not fail in one line
    assert BAD_SPACES[case] != DEMO_YAML.encode(), case
    space = tmp_path / "space.yaml"
    space.write_bytes(BAD_SPACES[case])
    db = tmp_path / "s.db"
    extra = ["--storage", f"sqlite:///{db}", "--no-progress"] if command == "search" else []
    r = run_cli([command, "--space", str(space), *extra], tmp_path)
    assert_one_line_error(r)
    assert str(space) in r.stderr
    assert study_rows(db) == 0 and study_rows(tmp_path / "default.db") == 0
    if case.startswith(("budget", "seed")):
        assert f"field '{case.split('_')[0]}'" in r.stderr


USAGE_ERRORS = {
    "workers_0": ["search", "--space", str(DEMO), "--workers", "0", "--dry-run"],
    "workers_negative": ["search", "--space", str(DEMO), "--workers", "-3", "--dry-run"],
    "workers_not_int": ["resume", "x", "--workers", "abc"],
    "search_without_space": ["search"],
    "unknown_command": ["frobnicate"],
    "unknown_option": ["status", "--bogus"],
    "unknown_option_of_group": ["storage", "--bogus"],
    "candidate_not_int": ["export", "s", "--candidate", "abc", "--out", "o"],
    "missing_argument": ["resume"],
    "merge_without_out": ["merge", "x.yaml"],
    "zoo_version_unknown": ["zoo", "build", "--version", "9"],
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    r = run_cli(USAGE_ERRORS[case], tmp_path)
    assert_one_line_error(r)
    assert "Usage:" not in r.stderr and "╭" not in r.stderr
    assert not (tmp_path / "default.db").exists() and not (tmp_path / "o").exists()
    if case.startswith("workers"):
        assert "--workers" in r.stderr


def test_bare_group_prints_help_exit_0(tmp_path: Path) -> None:
    for args in ([], ["zoo"], ["storage"]):
        r = run_cli(args, tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "Usage" in r.stdout + r.stderr


def make_foreign_storage(case: str, db: Path) -> None:
    """A SQLite URL's file that is not an evomerge database: a text file, or another application's."""
    if case == "text_file":
        db.write_text("not a database\n")
    else:
        con = sqlite3.connect(db)
        con.execute("create table notes (body text)")
        con.commit()
        con.close()


@pytest.mark.parametrize("case", ["text_file", "other_application"])
def test_storage_that_is_not_an_evomerge_database_is_left_unchanged(case: str, tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    make_foreign_storage(case, db)
    before = digest(db)
    for args in (["status"], ["front", "s"], ["storage", "upgrade"]):
        r = run_cli([*args, "--storage", f"sqlite:///{db}"], tmp_path)
        assert_one_line_error(r)
        assert "cannot open storage" in r.stderr
    assert digest(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]  # no -wal/-shm/journal left


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[str, list[str]]:
    return make_tiny_llama_family(tmp_path_factory.mktemp("family"), n_experts=2)


def mergekit_yaml(family: tuple[str, list[str]], weight: Any = 0.5) -> str:
    base, (a, b) = family
    return yaml.safe_dump({
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": a, "parameters": {"weight": weight}}, {"model": b, "parameters": {"weight": 0.5}}],
    })


@pytest.mark.parametrize("weight", ["abc", float("nan"), float("inf"), [1, "x"], {"filter": "mlp"}])
def test_mergekit_value_that_is_not_a_number(weight: Any, family, tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(mergekit_yaml(family, weight))
    r = run_cli(["merge", str(cfg), "--out", str(tmp_path / "out")], tmp_path)
    assert_one_line_error(r)
    assert "weight" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not_utf8", "int_5000_digits", "nested_too_deep", "not_a_mapping"])
def test_mergekit_file_that_cannot_be_read(case: str, tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_bytes(BAD_SPACES[case])
    r = run_cli(["merge", str(cfg), "--out", str(tmp_path / "out")], tmp_path)
    assert_one_line_error(r)
    assert not (tmp_path / "out").exists()


def make_target(kind: str, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """An --out target that must be refused, and what it holds before (to assert it is unchanged)."""
    if kind == "file":
        out = tmp_path / "target"
        out.write_text("keep me\n")
    elif kind == "symlink_to_folder":
        (tmp_path / "real").mkdir()
        out = tmp_path / "target"
        out.symlink_to(tmp_path / "real", target_is_directory=True)
    elif kind == "below_a_file":
        (tmp_path / "afile").write_text("keep me\n")
        out = tmp_path / "afile" / "sub"
    elif kind == "proc":
        out = Path("/proc/evomerge-cannot-write-here")
    else:
        raise AssertionError(kind)
    return out, snapshot(tmp_path)


def snapshot(root: Path) -> dict[str, Any]:
    return {str(p.relative_to(root)): (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


TARGETS = ["file", "symlink_to_folder", "below_a_file", "proc"]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("kind", TARGETS)
def test_merge_refuses_a_bad_target(kind: str, force: bool, family, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cfg = tmp_path / "m.yaml"
    cfg.write_text(mergekit_yaml(family))
    out, before = make_target(kind, work)
    r = run_cli(["merge", str(cfg), "--out", str(out), *(["--force"] if force else [])], tmp_path)
    assert_one_line_error(r)
    assert snapshot(work) == before
    if kind == "symlink_to_folder":
        assert "symbolic link" in r.stderr and not any((work / "real").iterdir())


def test_merge_into_an_empty_folder_still_works(family, tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(mergekit_yaml(family))
    (tmp_path / "out").mkdir()
    r = run_cli(["merge", str(cfg), "--out", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.fixture(scope="module")
def exported_store(family, tmp_path_factory) -> str:
    return make_exported_store(family, tmp_path_factory.mktemp("store"))


def make_exported_store(family: tuple[str, list[str]], d: Path) -> str:
    """A store holding study ``s`` with candidate 1, a merge of ``family`` (what export reads)."""
    from evomerge.merge.mergekit_io import load_merge_config  # torch-side: only the export tests need it

    cfg = d / "m.yaml"
    cfg.write_text(mergekit_yaml(family))
    recipe = load_merge_config(cfg).recipe
    url = f"sqlite:///{d / 'ex.db'}"
    with Store(url) as store:
        store.create_study("s", "x: 1", [{"name": "acc", "direction": "maximize"}], budget=2)
        n = store.add_candidate("s", proposal_key="a", genome=[0.5], recipe_json=recipe.canonical_json(),
                                recipe_hash=recipe.hash())
        store.complete_candidate("s", n, {"acc": 0.5})
    return url


@pytest.mark.parametrize("kind", TARGETS)
def test_export_refuses_a_bad_target(kind: str, exported_store: str, tmp_path: Path) -> None:
    out, before = make_target(kind, tmp_path)
    r = run_cli(["export", "s", "--candidate", "1", "--out", str(out), "--storage", exported_store], tmp_path)
    assert_one_line_error(r)
    assert snapshot(tmp_path) == before


def test_export_of_a_missing_candidate(exported_store: str, tmp_path: Path) -> None:
    r = run_cli(["export", "s", "--candidate", "7", "--out", str(tmp_path / "o"), "--storage", exported_store],
                tmp_path)
    assert_one_line_error(r)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- properties (hypothesis)

GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_space(draw) -> bytes:
    data = demo_data()
    paths = _paths(data)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = data
        try:
            for p in path[:-1]:
                parent = parent[p]
            action = draw(st.sampled_from(["replace", "delete", "unknown_key"]))
            if action == "replace":
                parent[path[-1]] = draw(GARBAGE)
            elif action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=8))] = draw(GARBAGE)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced this path
    text = yaml.safe_dump(data, sort_keys=False).encode()
    raw = draw(st.sampled_from(["as_is", "bad_bytes", "huge_int", "truncated"]))
    if raw == "bad_bytes":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=4).filter(_not_utf8)) + text[at:]
    elif raw == "huge_int":
        text = text.replace(b"budget: ", b"budget: " + b"9" * draw(st.integers(20, 6000)) + b"#", 1)
    elif raw == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    return text


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated_space())
def test_load_space_returns_a_space_or_one_line_space_error(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "space.yaml"
        p.write_bytes(text)
        try:
            sp = load_space(p)
        except SpaceError as e:
            msg = str(e)
            assert msg and "\n" not in msg and msg.startswith(str(p)), msg
            return
    assert isinstance(sp, SearchSpace)
    assert 0 < sp.budget < 2**31 and 0 <= sp.seed < 2**63


def test_the_mutations_reach_both_outcomes() -> None:
    # the property above is not vacuous: the unmutated space loads, a broken one does not
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "space.yaml"
        p.write_text(DEMO_YAML)
        assert isinstance(load_space(p), SearchSpace)
        bad = copy.deepcopy(demo_data())
        bad["budget"] = math.inf
        p.write_text(yaml.safe_dump(bad))
        with pytest.raises(SpaceError, match="budget"):
            load_space(p)


COMMANDS = [
    ["validate"], ["search", "--dry-run"], ["status"], ["front"], ["export"], ["resume"], ["merge"],
    ["storage", "upgrade"], ["zoo", "--bogus"], ["frobnicate"], [],
]
OPTIONS = ["--space", "--workers", "--storage", "--candidate", "--out", "--study", "--json", "--bogus", "--force"]


@st.composite
def argv(draw, files: dict[str, str]) -> list[str]:
    values = st.one_of(
        st.sampled_from(["0", "-3", "abc", "", "1", "99999999999999999999999", "s", *files.values()]),
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=8),
    )
    args = list(draw(st.sampled_from(COMMANDS)))
    for _ in range(draw(st.integers(0, 4))):
        args += draw(st.one_of(st.tuples(st.sampled_from(OPTIONS), values).map(list), values.map(lambda v: [v])))
    if args[:1] == ["search"]:
        args.append("--dry-run")  # never starts a study: only bad input is under test here
    return args


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli")
    files = {}
    for case in ("not_utf8", "budget_1e25", "not_a_mapping"):
        (d / f"{case}.yaml").write_bytes(BAD_SPACES[case])
        files[case] = str(d / f"{case}.yaml")
    (d / "text.db").write_text("not a database\n")
    files["text_db"] = f"sqlite:///{d / 'text.db'}"
    files["link"] = str(d / "link")
    os.symlink(d, d / "link")
    files["proc"] = "/proc/evomerge-x"
    files["good_space"] = str(DEMO)
    return files


def test_cli_argument_vectors_exit_0_or_one_line_2(cli_files: dict[str, str], tmp_path: Path) -> None:

    @settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
    @given(argv(cli_files))
    def prop(args: list[str]) -> None:
        r = run_cli(args, tmp_path)
        assert r.returncode in (0, 2), (args, r.returncode, r.stderr[-2000:])
        if r.returncode == 2:
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr[-2000:])
        assert study_rows(tmp_path / "default.db") == 0

    prop()


# the corpus through the real interpreter, one case of each kind: `python -m evomerge.cli` exits 2 with
# one line too (no interpreter-level traceback, no usage box from typer's own error display)
def test_one_case_of_each_kind_through_the_interpreter(family, exported_store: str, tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_bytes(BAD_SPACES["not_utf8"])
    (tmp_path / "text.db").write_text("not a database\n")
    (tmp_path / "m.yaml").write_text(mergekit_yaml(family, "abc"))
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    before = snapshot(tmp_path)
    for args in (
        ["search", "--space", str(DEMO), "--workers", "0"],
        ["frobnicate"],
        ["search", "--space", str(tmp_path / "space.yaml"), "--no-progress"],
        ["status", "--storage", f"sqlite:///{tmp_path / 'text.db'}"],
        ["merge", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "out")],
        ["export", "s", "--candidate", "1", "--out", str(tmp_path / "link"), "--storage", exported_store],
        ["export", "s", "--candidate", "1", "--out", str(tmp_path / "afile"), "--storage", exported_store],
    ):
        assert_one_line_error(run_cli(args, tmp_path, subprocess_=True))
    assert snapshot(tmp_path) == before


@st.composite
def mutated_mergekit(draw, family: tuple[str, list[str]]) -> dict[str, Any]:
    data = yaml.safe_load(mergekit_yaml(family))
    data["parameters"] = {"normalize": True}
    paths = _paths(data)
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(paths))
        parent = data
        try:
            for p in path[:-1]:
                parent = parent[p]
            if draw(st.booleans()):
                parent[path[-1]] = draw(GARBAGE)
            elif isinstance(parent, dict):
                parent.pop(path[-1], None)
        except (KeyError, IndexError, TypeError):
            pass
    return data


def test_mergekit_configs_load_or_raise_one_config_error(family, tmp_path: Path) -> None:
    from evomerge.merge.lora import LoraError
    from evomerge.merge.mergekit_io import MergeJob, load_merge_config
    from evomerge.merge.mergekit_settings import ConfigError

    @settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
    @given(mutated_mergekit(family))
    # found by this property: a key holding a line break was quoted into a two-line error
    @example({"base_model": {"\n": 0}, "merge_method": "task_arithmetic", "models": []})
    def prop(data: dict[str, Any]) -> None:
        p = tmp_path / "m.yaml"
        p.write_text(yaml.safe_dump(data))
        try:
            job = load_merge_config(p)
        except (ConfigError, LoraError) as e:
            assert str(e) and "\n" not in str(e), str(e)
            return
        assert isinstance(job, MergeJob)

    prop()


def test_commands_that_only_look_never_create_a_database(tmp_path: Path) -> None:
    empty = run_cli(["status"], tmp_path)
    assert empty.returncode == 0 and "no studies yet" in empty.stdout, empty.stderr
    assert run_cli(["status", "--json"], tmp_path).stdout.strip() == "[]"
    for args in (["front", "s"], ["export", "s", "--candidate", "1", "--out", str(tmp_path / "o")],
                 ["status", "--storage", f"sqlite:///{tmp_path / 'gone' / 'x.db'}"]):
        r = run_cli(args, tmp_path)
        if args[0] != "status":
            assert_one_line_error(r)
            assert "no database file" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no default.db, no x.db, no output folder


def test_a_merged_folder_gets_the_mode_mkdir_gives(family, tmp_path: Path) -> None:
    # written in a temporary folder (0700) and renamed: the model must not stay unreadable to the group
    cfg = tmp_path / "m.yaml"
    cfg.write_text(mergekit_yaml(family))
    umask = os.umask(0o022)
    try:
        r = run_cli(["merge", str(cfg), "--out", str(tmp_path / "out")], tmp_path)
    finally:
        os.umask(umask)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_zoo_report_names_a_missing_study_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "zoo_report.py"), "--study", "nosuch", "--storage",
                        f"sqlite:///{tmp_path / 'e.db'}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "zoo_report: no study named 'nosuch' in this storage", r.stderr
