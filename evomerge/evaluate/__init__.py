"""Evaluation of in-memory candidate models: lm-eval tasks and cost measures (see lm_eval_runner)."""

from evomerge.evaluate.lm_eval_runner import (
    EvaluationError,
    Evaluator,
    ObjectiveResult,
    count_nonzero_params,
)

__all__ = ["EvaluationError", "Evaluator", "ObjectiveResult", "count_nonzero_params"]
