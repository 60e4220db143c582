"""Genome kinds: how a search space's ``genome:`` block becomes genes, recipes, candidates and exports.

Each kind is a subpackage (``parameter_space/``, ``data_flow/``) whose ``__init__`` defines ``KIND``, a
:class:`~evomerge.genomes.base.GenomeKind`; :data:`KINDS` holds every one found here, so adding a kind
is one new folder. The rest of evomerge reaches a kind only through the functions below, by the
spec's ``type`` tag, the recipe's ``kind`` field or the genome's ``kind`` attribute.

Importing this package (and the kinds' spec, genome and recipe modules) loads neither torch nor
transformers: the driver and ``evomerge validate`` use it; materializing and exporting import them
when called.

Adding a kind is one folder ``evomerge/genomes/<name>/``: a pydantic spec whose ``type`` is
``Literal["<name>"]`` (the space file's ``genome: {type: <name>, ...}``), a genome class (``kind``,
``dim``, ``gene_names()``, ``decode(x)`` from the unit cube), a recipe class (a ``kind`` field,
``from_json``, ``canonical_json``, ``hash``), and in ``__init__`` a ``KIND = GenomeKind(...)`` naming
them with the materializer factory, the exporter, the cost measures and the two one-line texts;
heavy pieces imported inside the functions that need them. Then give it a space in
``tests/test_genome_kinds.py``, which runs every kind through decode, materialize, export and reload.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.genomes.base import (
    ExportCard,
    FieldError,
    GenomeDecoder,
    GenomeKind,
    Materializing,
    SpaceError,
    WorkerSettings,
)

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

# Spaces without a `genome.type` and recipes without a `kind` were written before data-flow genomes
# existed: they are parameter-space.
DEFAULT_KIND = "parameter_space"


def _discover() -> dict[str, GenomeKind]:
    kinds: dict[str, GenomeKind] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.ispkg:
            continue
        kind = getattr(importlib.import_module(f"{__name__}.{info.name}"), "KIND", None)
        if isinstance(kind, GenomeKind):
            if kind.name in kinds:
                raise RuntimeError(f"two genome kinds are named {kind.name!r}")
            kinds[kind.name] = kind
    return kinds


KINDS: dict[str, GenomeKind] = _discover()


def get_kind(name: str) -> GenomeKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown genome kind {name!r}; known: {', '.join(KINDS)}") from None


def kind_of(obj: Any) -> GenomeKind:
    """The kind of a spec (its ``type``), a recipe or a genome (their ``kind``)."""
    return get_kind(getattr(obj, "kind", None) or getattr(obj, "type", None) or DEFAULT_KIND)


def recipe_from_json(text: str):
    """A stored recipe of any kind, by its ``kind`` field (absent: parameter-space)."""
    return get_kind(json.loads(text).get("kind", DEFAULT_KIND)).recipe.from_json(text)


def make_genome(space: SearchSpace) -> GenomeDecoder:
    """The genome the space's ``genome:`` block asks for."""
    return kind_of(space.genome).make_genome(space)


def check_space(space: SearchSpace) -> None:
    """The kind's checks of a space (models, base model; on disk once loaded from a file); raises ValueError."""
    kind_of(space.genome).check_space(space)


def describe_genome(genome: GenomeDecoder) -> str:
    return kind_of(genome).describe(genome)


def recipe_summary(recipe: Any) -> str:
    return kind_of(recipe).summary(recipe)


def recipe_legend(recipe: Any) -> str:
    """How to read :func:`recipe_summary` of recipes of this kind (one line; empty when self-evident)."""
    return kind_of(recipe).legend(recipe)


def materializer(kind: str, cfg: WorkerSettings, device: str, dtype: Any) -> Materializing:
    return get_kind(kind).materializer(cfg, device, dtype)


def export_recipe(recipe: Any, out_dir: Path, card: ExportCard) -> Path:
    return kind_of(recipe).export(recipe, Path(out_dir), card)


def _all_measures() -> dict[str, Callable[[Any], float]]:
    out: dict[str, Callable[[Any], float]] = {}
    for kind in KINDS.values():
        for name, fn in kind.cost_measures.items():
            out.setdefault(name, fn)
    return out


# Every cost measure some kind offers (a measure two kinds share, like "params", is one function).
COST_MEASURES: dict[str, Callable[[Any], float]] = _all_measures()


def cost_measure(model: Any, measure: str) -> float:
    """A ``cost`` objective's value for ``measure`` on an in-memory candidate."""
    try:
        fn = COST_MEASURES[measure]
    except KeyError:
        raise ValueError(f"unknown cost measure {measure!r}; known: {', '.join(COST_MEASURES)}") from None
    return float(fn(model))


__all__ = [
    "COST_MEASURES",
    "DEFAULT_KIND",
    "KINDS",
    "ExportCard",
    "FieldError",
    "GenomeDecoder",
    "GenomeKind",
    "Materializing",
    "SpaceError",
    "WorkerSettings",
    "check_space",
    "cost_measure",
    "describe_genome",
    "export_recipe",
    "get_kind",
    "kind_of",
    "make_genome",
    "materializer",
    "recipe_from_json",
    "recipe_legend",
    "recipe_summary",
]
