"""What a genome kind gives the rest of evomerge: :class:`GenomeKind`, and the pieces the kinds share.

A kind is a subpackage of :mod:`evomerge.genomes` whose ``__init__`` defines ``KIND``; the registry
(:data:`evomerge.genomes.KINDS`) picks it up. This module imports neither torch nor the space, so the
registry loads on the driver and in ``evomerge validate`` at no cost.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from evomerge.zoo import ZOO_DESCRIPTIONS, ZOO_PREFIX, ZOO_VERSION, build_command, parse_zoo_uri

if TYPE_CHECKING:
    from evomerge.space import SearchSpace


class SpaceError(ValueError):
    """A search space that cannot be used; the message is one line naming the field.

    Defined here, below the space, because the genome kinds read the space (block counts, models) and
    report its problems in the same form; :mod:`evomerge.space` raises it too.
    """


class FieldError(SpaceError):
    """A problem of one field of a space (``field`` is its dotted path, e.g. ``models.1``).

    The space's validator turns it into a pydantic error at that location, so ``load_space`` prints
    ``field 'models.1': <message>`` like any other field's problem.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message

    def validation_error(self, title: str) -> ValidationError:
        loc = tuple(int(p) if p.isdigit() else p for p in self.field.split("."))
        err = PydanticCustomError("space", "{message}", {"message": self.message})
        return ValidationError.from_exception_data(title, [InitErrorDetails(type=err, loc=loc, input=None)])


class GenomeDecoder(Protocol):
    """Maps a point of the unit cube [0, 1]^dim onto a recipe, and names every gene."""

    kind: str

    @property
    def dim(self) -> int: ...

    def gene_names(self) -> list[str]: ...

    def decode(self, x: list[float]) -> Any: ...


class RecipeModel(Protocol):
    """A stored candidate: hashable, JSON round trip, tagged with its kind."""

    kind: str

    def canonical_json(self) -> str: ...

    def hash(self) -> str: ...


class WorkerSettings(Protocol):
    """The fields of a worker's configuration a materializer factory reads."""

    base: str | None
    sources: list[str]
    fused: str  # the space's evaluation.fused_kernels: "auto", "on" or "off"
    genome: dict[str, Any]  # the space's genome block, as data: each kind reads its own settings


@dataclass(frozen=True)
class Materializing:
    """What a worker holds to build candidates of one kind.

    ``materializer`` has ``new_model()`` and ``apply(recipe, model)`` (writes the candidate in place);
    ``merge_kernels`` is "fused", "native" or "eager" and ``note`` says why.
    """

    materializer: Any
    tokenizer_path: str
    merge_kernels: str = "eager"
    note: str = ""


@dataclass(frozen=True)
class ExportCard:
    """What the model card of an exported candidate says besides its recipe.

    ``objectives``/``report``: the search and held-out objectives (name, direction), in the space's
    order; ``scores`` holds both kinds; ``names``: a stored model reference -> as the user wrote it in
    the space; ``found``: how the candidate was found (algorithm, settings, budget, seed, overrides,
    space file, complete, failed), whatever of it is known.
    """

    study: str
    number: int
    scores: Mapping[str, float]
    objectives: list[dict]
    report: list[dict] = field(default_factory=list)
    names: Mapping[str, str] = field(default_factory=dict)
    found: Mapping[str, Any] = field(default_factory=dict)

    def name_of(self, ref: str) -> str:
        return self.names.get(ref, ref)


def describe_ref(ref: str) -> str:
    """What a model reference is, for a reader who has no evomerge (zoo:// names mean nothing to them)."""
    if ref.startswith(ZOO_PREFIX):
        try:
            version, name = parse_zoo_uri(ref)
            what = f"{ZOO_DESCRIPTIONS[name]} (zoo v{version})"
        except ValueError:
            version, what = ZOO_VERSION, "a model of the demo zoo"
        return f"{what}; `{build_command(version)}` builds it and prints its folder"
    if Path(ref).is_absolute() or ref.startswith("."):
        return "a local folder"
    return "a Hugging Face hub model"


def _value(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{int(v)}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.6g}"


def card_sections(card: ExportCard, models: list[tuple[str, str]]) -> list[str]:
    """The model card's sections every kind shares: sources (``models``: (role, stored reference)),
    scores (search, then held out) and how the candidate was found."""
    lines = ["## Sources", "", "| role | model | what it is |", "|---|---|---|"]
    lines += [f"| {role} | `{card.name_of(ref)}` | {describe_ref(card.name_of(ref))} |" for role, ref in models]
    lines += ["", "## Scores", "", "Search objectives steered the search; held-out ones were scored on the final "
              "front only.", "", "| objective | kind | direction | value |", "|---|---|---|---|"]
    for kind, objs in (("search", card.objectives), ("held out", card.report)):
        lines += [f"| {o['name']} | {kind} | {o.get('direction', 'maximize')} | {_value(card.scores.get(o['name']))} |"
                  for o in objs]
    f = card.found
    lines += ["", "## How it was found", "", f"- study `{card.study}`, candidate {card.number}"]
    if "algorithm" in f:
        settings = f" with settings `{json.dumps(f.get('settings') or {})}`" if f.get("settings") else ""
        lines.append(f"- algorithm `{f['algorithm']}`{settings}")
    if "budget" in f:
        done = f" ({f['complete']} complete, {f['failed']} failed so far)" if "complete" in f else ""
        lines.append(f"- budget {f['budget']} candidates{done}, seed {f.get('seed', 0)}")
    if f.get("file"):
        lines.append(f"- space file `{f['file']}`")
    if f.get("overrides"):
        lines.append(f"- overrides `--set {' '.join(f['overrides'])}`")
    lines.append("")
    return lines


def scores_table(scores: Mapping[str, float], objectives: list[dict]) -> list[str]:
    """The model card's section of the scores the search recorded, one row per objective."""
    return [
        "## Scores recorded by the search",
        "",
        "| objective | direction | value |",
        "|---|---|---|",
        *(f"| {o['name']} | {o.get('direction', 'maximize')} | {scores.get(o['name'], float('nan')):.6g} |"
          for o in objectives),
        "",
    ]


@dataclass(frozen=True)
class GenomeKind:
    """One genome kind: its space-file block, its decoding, how candidates are built, exported and costed.

    - ``name``: the spec's ``type:`` tag in a space file and the recipe's ``kind`` field;
    - ``spec``: the pydantic model of the space's ``genome:`` block (its ``type`` is a Literal of ``name``);
    - ``recipe``: the recipe class (``from_json``, ``canonical_json``, ``hash``, field ``kind``);
    - ``make_genome(space)``: the genome of a space whose ``genome`` is this kind's spec;
    - ``check_space(space)``: cross-field checks of the space (models, base model), raising ValueError;
      when the space was loaded from a file (``source_dir`` set) also its model folders, configs and
      tensor shapes, without loading weights (:mod:`evomerge.genomes.checks`), raising FieldError;
    - ``materializer(cfg, device, dtype)``: what a worker builds candidates with; ``cfg`` is the worker's
      :class:`WorkerSettings` (a ``evomerge.workers.WorkerConfig``), ``device`` a torch device string;
    - ``export(recipe, out_dir, card)``: write the candidate as a Hugging Face folder (``out_dir`` absent
      or empty; written beside and renamed into place);
    - ``cost_measures``: measure name -> function of the in-memory candidate (for ``cost`` objectives);
    - ``describe(genome)``: one line for ``search --dry-run``; ``summary(recipe)``: one cell of ``front``;
      ``legend(recipe)``: one line under the front table saying how to read that cell.
    """

    name: str
    spec: type[BaseModel]
    recipe: type[BaseModel]
    make_genome: Callable[[SearchSpace], GenomeDecoder]
    check_space: Callable[[SearchSpace], None]
    materializer: Callable[[WorkerSettings, str, Any], Materializing]
    export: Callable[[Any, Path, ExportCard], Path]
    cost_measures: Mapping[str, Callable[[Any], float]]
    describe: Callable[[Any], str]
    summary: Callable[[Any], str]
    legend: Callable[[Any], str] = lambda recipe: ""


def nonzero_params(model: Any) -> int:
    """Number of non-zero entries over the model's parameters (tied or shared tensors counted once)."""
    import torch  # only on a worker, which holds a model; the registry stays light

    seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += int(torch.count_nonzero(p).item())
    return total
