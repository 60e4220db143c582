"""The ``cost`` kind: a property of the merged model itself (its size, its path length); nothing is run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from evomerge.objectives.base import EvalContext, EvaluationError, KindEvaluator, Objective, ObjectiveResult, Window


class CostObjective(Objective):
    kind: Literal["cost"] = "cost"
    # "params" (non-zero parameters of the candidate); for data-flow candidates also "path_length" (blocks on
    # the path) and "path_params" (parameters the path uses, shared ones once). The worker's genome kind
    # computes them.
    measure: Literal["params", "path_length", "path_params"]

    def fidelity_problem(self) -> str | None:
        return None  # no examples: the value is exact at any fidelity

    @classmethod
    def evaluator(cls, context: EvalContext) -> KindEvaluator:
        return CostEvaluator(context.measure)


class CostEvaluator:
    """Reads each cost objective's measure off the model. ``measure(model, name)`` comes from the worker (its genome
    kind knows the measures of its models, and this package knows no model)."""

    def __init__(self, measure: Callable[[Any, str], float] | None = None) -> None:
        self.measure = measure

    def prepare(self, objectives: Sequence[Objective]) -> None:
        pass

    def num_examples(self, objective: Objective) -> int:
        raise EvaluationError(f"objective '{objective.name}': a cost has no examples to slice")

    def evaluate(
        self, model: Any, objectives: Sequence[Objective], window: Window | None = None
    ) -> dict[str, ObjectiveResult]:
        out: dict[str, ObjectiveResult] = {}
        for o in objectives:
            assert isinstance(o, CostObjective)
            if self.measure is None:
                raise EvaluationError(f"objective '{o.name}': a cost measure needs the worker's genome kind")
            value = self.measure(model, o.measure)
            out[o.name] = ObjectiveResult(float(value), [])
        return out


KIND = CostObjective
