"""Every `evomerge` command the README and the spaces' comments show is one the CLI accepts.

Each is run with `--help` appended (click answers help before it converts a value, so placeholders
such as `N` or `FILE` pass, while an unknown command or option fails); a `search` naming one of the
shipped spaces runs for real with `--dry-run` (the space is read and checked, nothing starts), and a
`validate` of one of them runs as written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _joined(lines: list[str]) -> list[str]:
    """Lines with shell continuations (a trailing backslash) joined."""
    out: list[str] = []
    cont = False
    for line in lines:
        if cont:
            out[-1] = out[-1].rstrip("\\").rstrip() + " " + line.strip()
        else:
            out.append(line)
        cont = line.rstrip().endswith("\\")
    return out


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every `evomerge ...` in README.md's code blocks and the spaces' comments."""
    found: list[tuple[str, str]] = []
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```(?:bash)?\n(.*?)```", readme, flags=re.S):
        for line in _joined(block.splitlines()):
            line = re.split(r"\s#\s", line)[0]  # a comment may name evomerge too
            for m in re.finditer(r"(?:^|\s|/)evomerge (\S.*?)(?=\s+&&|\s*$)", line):
                found.append(("README.md", m.group(1)))
    for space in sorted((ROOT / "search_spaces").glob("*.yaml")):
        comments = [ln.lstrip("#").strip() for ln in space.read_text().splitlines() if ln.startswith("#")]
        for line in _joined(comments):
            line = re.split(r"\s#\s", line)[0]  # a comment after the command
            # a command ends at a wide gap before a note, or at the backtick closing it in prose
            for m in re.finditer(r"evomerge ([^\s`][^`]*?)(?=\s{3,}\(|`|$)", line):
                found.append((space.name, m.group(1)))
    return found


def _argv(command: str) -> list[str]:
    # optional parts are shown in brackets: type them (each must be an option the command has)
    text = re.sub(r"\[([^\]]*)\]", r" \1 ", command).replace("...", " ")
    return [a.split("|")[0] for a in shlex.split(text)]  # a choice shown as a|b|c: its first


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    where = {w for w, _ in COMMANDS}
    assert "README.md" in where and "demo.yaml" in where and "ja_math.yaml" in where, COMMANDS
    names = {_argv(c)[0] for _, c in COMMANDS}
    assert {"search", "resume", "status", "front", "export", "validate", "merge", "zoo", "storage"} <= names


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_documented_command_is_accepted(where: str, command: str, tmp_path: Path) -> None:
    argv = _argv(command)
    spaces = [a for a in argv if a.startswith("search_spaces/") and (ROOT / a).is_file()]
    if argv[0] == "validate" and spaces:
        run = argv
    elif argv[0] == "search" and spaces and "study://" not in (ROOT / spaces[0]).read_text():
        # a real dry run: no cluster, no database; the rest of the line is still parsed (a space that
        # builds on a stored candidate needs that study first: only its command line is checked)
        run = [*argv, "--dry-run"]
    elif argv == ["--install-completion"]:
        run = ["--show-completion", "bash"]  # the same script, printed instead of written to a shell's rc file
    else:
        run = [*argv, "--help"]
    env = {**os.environ, "HOME": str(tmp_path)}  # nothing the command might write lands in the real home
    cmd = [sys.executable, "-m", "evomerge.cli", *run]
    if run[0] == "--show-completion":  # from a bash, as a user types it: the shell is read off the caller
        cmd = ["/bin/bash", "-c", shlex.join(cmd[:-1]) + "; exit $?"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, f"{where}: `evomerge {command}` -> {run}: {p.stderr[-1500:]}"
    if run[0] == "--show-completion":
        assert "evomerge" in p.stdout, p.stdout
    elif run[-1] == "--help":
        assert p.stdout.startswith("Usage: evomerge"), p.stdout[:300]
