"""One worker's evaluator: hands each objective to the evaluator of its kind (built once, on first need)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from evomerge.objectives.base import EvalContext, KindEvaluator, Objective, ObjectiveResult, Window
from evomerge.objectives.registry import KINDS


class Evaluator:
    """Evaluates in-memory models on objectives of any kind; build one per worker.

    ``objectives``: prepared now (tasks loaded and checked, scorers imported); objectives passed later to
    :meth:`evaluate` are prepared on first use. ``task_paths``: directories (searched recursively for
    ``*.yaml``) or YAML files defining lm-eval tasks. ``tokenizer``: the tokenizer the models use.
    ``batch_size``: the lm-eval batch size. ``cache_dir``: where parsed data files are cached (a private
    temporary directory when None). ``base_dir``: what relative task paths, YAML task references and scorer
    files resolve against (the space file's directory). ``measure(model, name)``: a cost measure of the model being
    evaluated, from the worker's genome kind (without it, cost objectives know only ``params``).
    """

    def __init__(
        self,
        objectives: Sequence[Objective],
        task_paths: Sequence[str | os.PathLike],
        tokenizer: Any,
        batch_size: int,
        cache_dir: str | os.PathLike | None = None,
        *,
        base_dir: str | os.PathLike | None = None,
        measure: Callable[[Any, str], float] | None = None,
        quiet: bool = True,
    ) -> None:
        self.objectives = list(objectives)
        self.context = EvalContext(
            tokenizer=tokenizer,
            task_paths=list(task_paths),
            batch_size=batch_size,
            cache_dir=cache_dir,
            base_dir=base_dir,
            measure=measure,
            quiet=quiet,
        )
        self._kinds: dict[str, KindEvaluator] = {}
        for kind, cls in KINDS.items():
            mine = [o for o in self.objectives if o.kind == kind]
            if cls.needs_evaluator(mine, self.context):
                self.for_kind(kind).prepare(mine)

    def for_kind(self, kind: str) -> KindEvaluator:
        """The evaluator of one objective kind (built on first use)."""
        if kind not in self._kinds:
            self._kinds[kind] = KINDS[kind].evaluator(self.context)
        return self._kinds[kind]

    def prepare(self, objectives: Iterable[Objective]) -> None:
        """Check and load what these objectives need."""
        for kind, mine in _by_kind(objectives).items():
            self.for_kind(kind).prepare(mine)

    def num_docs(self, objective: Objective) -> int:
        """How many examples a full evaluation of ``objective`` scores (its limit, or all of them)."""
        ev = self.for_kind(objective.kind)
        ev.prepare([objective])
        return ev.num_examples(objective)

    def evaluate(
        self, model: Any, objectives: Sequence[Objective] | None = None, window: Window | None = None
    ) -> dict[str, ObjectiveResult]:
        """Scores of ``model`` on ``objectives`` (default: the constructor's), keyed by objective name, in order.

        ``window=(a, b)`` scores only examples ``a <= i < b`` of each per-example objective (clipped to its
        limit): multi-fidelity evaluation scores a first slice, then the rest. Objectives without examples
        (costs) ignore it. NaN / infinite values come back as they are.
        """
        objs = list(self.objectives if objectives is None else objectives)
        out: dict[str, ObjectiveResult] = {}
        for kind, mine in _by_kind(objs).items():
            out.update(self.for_kind(kind).evaluate(model, mine, window))
        return {o.name: out[o.name] for o in objs}


def _by_kind(objectives: Iterable[Objective]) -> dict[str, list[Objective]]:
    groups: dict[str, list[Objective]] = {}
    for o in objectives:
        groups.setdefault(o.kind, []).append(o)
    return groups
