"""The CLI starts fast: heavy modules are imported by the commands that need them, not at start-up.

`evomerge merge CONFIG --out DIR` is timed whole-process against mergekit-yaml, and `--help` should
answer at once, so neither may pay for SQLAlchemy, Ray, lm-eval or the search libraries.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

HEAVY = ("sqlalchemy", "ray", "lm_eval", "optuna", "pymoo")


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
