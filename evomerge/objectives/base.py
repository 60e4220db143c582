"""What an objective is, whatever its kind: the fields every kind shares, what a kind declares about its
values (bounded, multi-fidelity), and the evaluator a worker builds once per kind.

A kind is one module in ``evomerge/objectives/kinds/`` whose ``KIND`` is a subclass of :class:`Objective`
with ``kind: Literal["<module name>"]``: the registry finds it, the space validates ``objectives:`` entries
with it, and workers score it through its :meth:`Objective.evaluator`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_KIND = "lm_eval"  # spaces written before objectives had kinds name no kind: lm-eval tasks


class Subset(tuple):
    """Explicit example indices of an objective, ascending (anchor-subset estimation scores these only)."""


# Examples lo <= i < hi of an objective (multi-fidelity slices), or an explicit Subset of them.
Window = tuple[int, int] | Subset


def window_indices(window: Window | None, n: int) -> list[int]:
    """The example indices below ``n`` that ``window`` selects (all of them for None)."""
    if window is None:
        return list(range(n))
    if isinstance(window, Subset):
        return [int(i) for i in window if 0 <= int(i) < n]
    lo, hi = window
    return list(range(lo, min(hi, n)))


class EvaluationError(ValueError):
    """An objective that cannot be evaluated (unknown task, metric or scorer, missing data, bad scores)."""


@dataclass(frozen=True)
class ObjectiveResult:
    """One objective's score: ``value``, and ``samples``, its per-example scores in example order (empty for
    a value with no examples, such as a cost)."""

    value: float
    samples: list[float] = field(default_factory=list)


@dataclass
class EvalContext:
    """What a worker hands every kind's evaluator, once: the tokenizer of its models, the space's lm-eval task
    paths, the batch size, where to cache data, the directory relative references resolve against (the space
    file's), and ``measure(model, name)``, a cost measure of a candidate (the genome kind knows them)."""

    tokenizer: Any
    task_paths: Sequence[str | os.PathLike] = ()
    batch_size: int = 32
    cache_dir: str | os.PathLike | None = None
    base_dir: str | os.PathLike | None = None
    measure: Callable[[Any, str], float] | None = None
    quiet: bool = True


class KindEvaluator(Protocol):
    """Scores the objectives of one kind on in-memory models; built once per worker by the kind."""

    def prepare(self, objectives: Sequence[Objective]) -> None:
        """Check and load what these objectives need (tasks, data, scorers); idempotent."""

    def num_examples(self, objective: Objective) -> int:
        """How many examples a full evaluation of ``objective`` scores (multi-fidelity slices them)."""

    def evaluate(
        self, model: Any, objectives: Sequence[Objective], window: Window | None = None
    ) -> dict[str, ObjectiveResult]:
        """Scores of ``model`` keyed by objective name (objectives not prepared yet are prepared first);
        ``window`` restricts per-example objectives to a slice of their examples."""


class Objective(BaseModel):
    """An objective of any kind; each kind subclasses it.

    ``Objective(**fields)`` and ``Objective.model_validate(data)`` build the kind that ``kind`` names
    (``lm_eval`` when absent), so the base class works as the type of, and the way to make, any objective.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str = DEFAULT_KIND
    direction: Literal["maximize", "minimize"] = "maximize"
    # How many examples to score (the first ones); kinds without examples ignore it.
    limit: int | None = Field(default=None, gt=0)
    # Weight in the scalarised objective of single-objective algorithms (CMA-ES).
    weight: float = Field(default=1.0, allow_inf_nan=False)

    # Set by evomerge.objectives.registry once it has imported every kind (the kinds subclass this class,
    # so it cannot import them): how the base class builds the kind an entry names.
    _kind_class: ClassVar[Callable[[str | None], type[Objective]]]
    _parse: ClassVar[Callable[..., Objective]]

    def __new__(cls, *args: Any, **data: Any) -> Objective:
        if cls is Objective:
            cls = Objective._kind_class(data.get("kind"))
        return super().__new__(cls)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Objective:  # type: ignore[override]
        if cls is Objective:
            return Objective._parse(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _drop_unset_foreign_fields(cls, data: Any) -> Any:
        # Spaces stored before each kind had its own model carry every kind's fields, the unused ones null.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data

    # -- what the kind declares ---------------------------------------------------------------------------
    def is_bounded(self) -> bool:
        """Whether the value is known to lie in [0, 1] before any result (fixes the reference point)."""
        return False

    def supports_fidelity(self) -> bool:
        """Whether the value is the mean of per-example scores in [0, 1], so multi-fidelity can score a slice."""
        return False

    def fidelity_problem(self) -> str | None:
        """Why a multi-fidelity search cannot use this objective, or None when it can (staged, or exact); the
        space says "multi_fidelity needs per-example scores in [0, 1] with a mean; objective 'x' <this>"."""
        return None if self.supports_fidelity() else "has none"

    def missing_reference(self, base_dir: Path | None, task_paths: Sequence[str]) -> tuple[str, str] | None:
        """The field and the problem when a file or task this objective names is not there (checked when a
        space file is loaded, before anything runs; relative references resolve against ``base_dir``)."""
        return None

    def portable(self, resolve: Callable[[str], str]) -> Objective:
        """The objective with its file references made absolute by ``resolve`` (for workers elsewhere)."""
        return self

    @classmethod
    def needs_evaluator(cls, objectives: Sequence[Objective], context: EvalContext) -> bool:
        """Whether a worker builds this kind's evaluator up front (given the objectives of this kind)."""
        return bool(objectives)

    @classmethod
    def evaluator(cls, context: EvalContext) -> KindEvaluator:
        """The evaluator of this kind for one worker."""
        raise NotImplementedError(f"objective kind {cls.__name__} has no evaluator")
