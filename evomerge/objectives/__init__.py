"""Objectives: what a candidate is scored on. One kind per module in ``kinds/`` (``lm_eval``, ``cost``,
``python``), each declaring its config, whether its value is bounded, whether multi-fidelity can slice it,
and how a worker evaluates it.
"""

from evomerge.objectives.base import (
    EvalContext,
    EvaluationError,
    KindEvaluator,
    Objective,
    ObjectiveResult,
)
from evomerge.objectives.evaluator import Evaluator
from evomerge.objectives.kinds.lm_eval import BOUNDED_METRICS, FIDELITY_METRICS
from evomerge.objectives.registry import (
    KIND_TAGS,
    KINDS,
    ObjectiveSpec,
    is_bounded,
    kind_class,
    parse_objective,
    supports_fidelity,
)

__all__ = [
    "BOUNDED_METRICS",
    "FIDELITY_METRICS",
    "KINDS",
    "KIND_TAGS",
    "EvalContext",
    "EvaluationError",
    "Evaluator",
    "KindEvaluator",
    "Objective",
    "ObjectiveResult",
    "ObjectiveSpec",
    "is_bounded",
    "kind_class",
    "parse_objective",
    "supports_fidelity",
]
