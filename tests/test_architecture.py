"""The package's shape: imports flow one way, no circles, files readable in one sitting.

docs/architecture.md explains the layers; this test keeps the code to them. It reads the sources with
``ast`` (nothing is imported), so it runs in well under a second.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "evomerge"
MAX_LINES = 700

# Lowest first: a module may import from its own layer or a lower one, never from a higher one.
LAYERS: list[set[str]] = [
    {"cache", "files", "recipe", "front", "fidelity", "store", "search", "zoo", "study_refs"},
    {"merge"},
    {"genomes", "objectives"},
    {"space"},
    {"workers", "view"},
    {"run"},
    {"export", "merge_cli", "tables", "cli", "dashboard"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _sources()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported evomerge module, line, at module top) for every runtime import of a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def resolve(mod: str, level: int) -> str:
        if level == 0:
            return mod
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([mod] if mod else []))

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # type-only imports create no runtime edge
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("evomerge"):
                        found.append((a.name, child.lineno, top))
            elif isinstance(child, ast.ImportFrom):
                mod = resolve(child.module or "", child.level)
                if not mod.startswith("evomerge"):
                    continue
                for a in child.names:
                    sub = f"{mod}.{a.name}"
                    found.append((sub if sub in MODULES else mod, child.lineno, top))
            nested = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, nested)

    visit(tree, True)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_top_level_unit_has_a_layer():
    units = {_unit(m) for m in MODULES} - {""}
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS and docs/architecture.md: {units - set(LAYER_OF)}"


def test_no_import_from_a_lower_layer_up():
    bad = []
    for mod, imports in GRAPH.items():
        src = LAYER_OF.get(_unit(mod))
        for target, line, _ in imports:
            dst = LAYER_OF.get(_unit(target))
            if src is not None and dst is not None and dst > src:
                bad.append(f"{MODULES[mod].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circles():
    edges = {m: {t for t, _, _ in imps if t in MODULES and t != m} for m, imps in GRAPH.items()}
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in edges:
        if v not in index:
            strongconnect(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_file_is_readable_in_one_sitting(path: Path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (at most {MAX_LINES})"


def _says_why(lines: list[str], lineno: int) -> bool:
    """A comment on the import, on an import of the same block, or on the line above the block."""
    i = lineno - 1
    while True:
        if "#" in lines[i]:
            return True
        if i == 0 or not re.match(r"\s*(from|import)\s", lines[i - 1]):
            return i > 0 and lines[i - 1].strip().startswith("#")
        i -= 1


def test_imports_inside_functions_say_why():
    """An import below module top is for an optional heavy dependency; a comment says so."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno}"
                    for node in ast.walk(fn)
                    if isinstance(node, ast.Import | ast.ImportFrom) and not _says_why(lines, node.lineno)
                ]
    bad = sorted(set(bad))
    assert not bad, f"{len(bad)} imports inside functions without a comment saying why:\n" + "\n".join(bad)


def test_nothing_cites_files_outside_the_repository():
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in [*PKG.rglob("*.py"), *PKG.rglob("*.c"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md",
                  *(ROOT / "bench").glob("*.py"), *(ROOT / "search_spaces").glob("*.yaml"),
                  *(p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_architecture.py")]
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "DESIGN.md" in line or "DESIGN section" in line
    ]
    assert not hits, "cites a design file users do not have: " + ", ".join(hits)


def test_no_merge_conflict_markers():
    # a conflicted merge once landed in README.md with both sides of a table row: git does not refuse it
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    marker = re.compile(r"^(<{7} |={7}$|>{7} )", re.M)
    hits = []
    for name in tracked:
        p = ROOT / name
        if p.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".c", ".h", ".js", ".html", ".css", ".sh", ".txt"} \
                and p.is_file() and marker.search(p.read_text(errors="replace")):
            hits.append(name)
    assert not hits, "merge conflict markers in: " + ", ".join(hits)
