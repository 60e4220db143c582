"""The CLI starts fast: heavy modules are imported by the commands that need them, not at start-up.

`evomerge merge CONFIG --out DIR` is timed whole-process against mergekit-yaml, and `--help` should
answer at once, so neither may pay for SQLAlchemy, Ray, lm-eval or the search libraries. `status`,
`front`, `validate` (any space), `search --dry-run` and every error path answer in well under a second:
none of them may import torch, Ray, transformers, lm-eval or a search library.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("sqlalchemy", "ray", "lm_eval", "optuna", "pymoo")
# what no light command may import (each costs 0.3-4 s of start-up)
MODEL_LIBS = ("torch", "ray", "transformers", "lm_eval", "cma", "pymoo", "optuna", "scipy")
ROOT = Path(__file__).resolve().parents[1]


def _loaded(code: str) -> list[str]:
    probe = f"\nimport sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code + probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return ast.literal_eval(p.stdout.strip().splitlines()[-1])


def test_import_cli_loads_no_heavy_module():
    assert _loaded("import evomerge.cli") == []


def test_help_loads_no_heavy_module():
    # main() as `evomerge --help` runs it (it exits through SystemExit(0)).
    code = (
        "import sys; sys.argv = ['evomerge', '--help']\n"
        "from evomerge.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
    )
    assert _loaded(code) == []


def test_error_of_a_lazily_imported_module_is_one_line(tmp_path: Path):
    # SpaceError comes from a module main() no longer imports up front: still one line, exit code 2.
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a]\nobjectives: []\n")
    p = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "validate", "--space", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_reading_the_operator_specs_loads_no_torch():
    # Validating a space reads the operator registry (genes, bounds, source counts); torch comes with the
    # first tensor operation, so `validate` and a search's start do not pay its import.
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "from evomerge.genomes import make_genome\n"
        "from evomerge.merge import OPERATORS\n"
        "from evomerge.space import load_space\n"
        f"make_genome(load_space({str(root / 'search_spaces' / 'demo.yaml')!r}))\n"
        "assert len(OPERATORS) > 10 and all(s.param_bounds is not None for s in OPERATORS.values())\n"
        "print('torch' in sys.modules, 'sqlalchemy' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False False"  # nor the store: only a space naming a stored candidate opens it


@pytest.fixture(scope="module")
def study_db(tmp_path_factory) -> tuple[Path, str]:
    from evomerge.recipe import LayerGroup, Recipe
    from evomerge.store import Store

    d = tmp_path_factory.mktemp("light")
    url = f"sqlite:///{d / 'light.db'}"
    r = Recipe(base="zoo://base", sources=["zoo://arith", "zoo://script"], method="task_arithmetic",
               groups=[LayerGroup(name="embed", kind="embed", weights=[0.5, 0.5])])
    with Store(url) as store:
        store.create_study("s", "budget: 2\n", [{"name": "acc", "direction": "maximize"}], budget=2)
        n = store.add_candidate("s", proposal_key="a", genome=[0.5], recipe_json=r.canonical_json(),
                                recipe_hash=r.hash())
        store.complete_candidate("s", n, {"acc": 0.5})
    (d / "full").mkdir()
    (d / "full" / "keep").write_text("x")
    return d, url


LIGHT = {
    "status": (["status", "--storage", "{url}"], 0),
    "status --json": (["status", "--json", "--storage", "{url}"], 0),
    "front": (["front", "s", "--storage", "{url}"], 0),
    "front --wide": (["front", "s", "--wide", "--storage", "{url}"], 0),
    "validate demo": (["validate", "--space", str(ROOT / "search_spaces" / "demo.yaml")], 0),
    "validate ja_math": (["validate", "--space", str(ROOT / "search_spaces" / "ja_math.yaml")], 0),
    "validate dfs_demo": (["validate", "--space", str(ROOT / "search_spaces" / "dfs_demo.yaml")], 0),
    "search --dry-run": (["search", "--space", str(ROOT / "search_spaces" / "demo.yaml"), "--dry-run",
                          "--set", "algorithm.settings.n_front=4"], 0),
    "search bad --set": (["search", "--space", str(ROOT / "search_spaces" / "demo.yaml"), "--set", "budget=x"], 2),
    "search unknown setting": (["search", "--space", str(ROOT / "search_spaces" / "demo.yaml"), "--set",
                                "algorithm.settings.bogus=1", "--storage", "{url}"], 2),
    "search --workers 0": (["search", "--space", str(ROOT / "search_spaces" / "demo.yaml"), "--workers", "0"], 2),
    "front unknown study": (["front", "nope", "--storage", "{url}"], 2),
    "resume unknown study": (["resume", "nope", "--storage", "{url}"], 2),
    "export no such candidate": (["export", "s", "--candidate", "9", "--out", "{dir}/o", "--storage", "{url}"], 2),
    "export folder not empty": (["export", "s", "--candidate", "1", "--out", "{dir}/full", "--storage", "{url}"], 2),
    "merge into a full folder": (["merge", "{dir}/m.yaml", "--out", "{dir}/full"], 2),
    "merge on a bad device": (["merge", "{dir}/m.yaml", "--out", "{dir}/o", "--device", "tpu"], 2),
    "bad log format": (["search", "--space", str(ROOT / "search_spaces" / "demo.yaml"), "--log-format", "xml"], 2),
}


@pytest.mark.parametrize("case", sorted(LIGHT))
def test_light_commands_import_no_model_library(case: str, study_db) -> None:
    d, url = study_db
    args, code = LIGHT[case]
    argv = [a.replace("{url}", url).replace("{dir}", str(d)) for a in args]
    probe = (
        f"import sys; sys.argv = ['evomerge', *{argv!r}]\n"
        "from evomerge.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code or 0\nelse:\n    rc = 0\n"
        f"print(rc, sorted(m for m in {MODEL_LIBS!r} if m in sys.modules), file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=d)
    last = p.stderr.strip().splitlines()[-1]
    rc, loaded = int(last.split(" ", 1)[0]), ast.literal_eval(last.split(" ", 1)[1])
    assert rc == code, p.stderr[-2000:]
    assert loaded == [], f"{case} imported {loaded}"
    if code == 2:
        assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 2, p.stderr
    assert not (d / "o").exists()


def test_reading_a_store_at_head_imports_no_alembic(study_db) -> None:
    # Alembic (a fifth of a second) is for upgrades: status, front and export's checks read without it
    _, url = study_db
    code = (f"import sys; sys.argv = ['evomerge', 'status', '--storage', {url!r}]\n"
            "from evomerge.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('alembic' in sys.modules, file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stderr.strip().splitlines()[-1] == "False", p.stderr[-2000:]
