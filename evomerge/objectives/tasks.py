"""Where an lm-eval objective's task is, found the way the evaluator finds it but without lm-eval.

A space is checked before anything runs, and importing lm-eval (and datasets, torch) costs seconds, so
this reads the task YAMLs' ``task:`` names with PyYAML: a name is a task of a YAML file given in
``task_paths`` or of one under a task directory there (lm-eval indexes ``**/*.yaml``), or the task is a
YAML file itself (relative to the space file, else to a task directory or the one above it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class _TaskLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads lm-eval's tags (``!function module.fn``) as nothing."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_name_of(path: Path) -> str | None:
    """The ``task:`` a YAML file defines, or None (an include file, a group, unreadable)."""
    try:
        cfg: Any = yaml.load(path.read_text(), Loader=_TaskLoader)  # noqa: S506 - a safe loader
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    name = cfg.get("task") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) else None


def resolve_path(ref: str | os.PathLike, base_dir: Path | None) -> Path:
    """A task reference as an absolute path: relative ones against ``base_dir`` (the space file's folder)."""
    p = Path(ref).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p.resolve()


def bad_task_path(task_paths: Sequence[str], base_dir: Path | None) -> tuple[int, str] | None:
    """The index of the first task path that is neither a directory nor a YAML file, and why."""
    for i, tp in enumerate(task_paths):
        p = resolve_path(tp, base_dir)
        if not (p.is_dir() or (p.is_file() and p.suffix in (".yaml", ".yml"))):
            return i, f"task path '{tp}' is neither a directory nor a YAML file ({p})"
    return None


def known_tasks(task_paths: Sequence[str], base_dir: Path | None) -> dict[str, Path]:
    """Task name -> its YAML file, over every task path."""
    out: dict[str, Path] = {}
    for tp in task_paths:
        p = resolve_path(tp, base_dir)
        files = sorted(p.glob("**/*.yaml")) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            name = task_name_of(f)
            if name is not None:
                out.setdefault(name, f)
    return out


def task_file(ref: str, task_paths: Sequence[str | os.PathLike], base_dir: Path | None) -> Path | None:
    """The YAML file a task reference ending in .yaml/.yml names: relative to ``base_dir``, else (a
    space's "task: its_tasks/x.yaml" read without its folder) to a task directory or the one above it."""
    p = resolve_path(ref, base_dir)
    if p.suffix not in (".yaml", ".yml"):
        return None
    if p.is_file():
        return p
    if not Path(ref).expanduser().is_absolute():
        for tp in task_paths:
            d = resolve_path(tp, base_dir)
            if not d.is_dir():
                continue
            for root in (d, d.parent):
                if (root / ref).is_file():
                    return (root / ref).resolve()
    return None


def find_task(ref: str, task_paths: Sequence[str], base_dir: Path | None) -> tuple[Path | None, list[str]]:
    """The YAML file of task ``ref`` (None when there is none) and the task names that are known."""
    known = known_tasks(task_paths, base_dir)
    return known.get(ref) or task_file(ref, task_paths, base_dir), sorted(known)
