"""The ``lm_eval`` kind: an lm-eval task's metric on the in-memory model (the default kind)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from evomerge.objectives.base import EvalContext, KindEvaluator, Objective
from evomerge.objectives.tasks import find_task

# Metrics known to lie in [0, 1], so a study's reference point can be fixed before any result.
BOUNDED_METRICS = frozenset({"exact_match", "acc", "acc_norm", "f1", "mcc", "bleu_acc", "pass@1"})
# Metrics whose task score is the mean of per-example scores in [0, 1] (multi-fidelity can slice them).
FIDELITY_METRICS = frozenset({"exact_match", "acc", "acc_norm"})


class LmEvalObjective(Objective):
    kind: Literal["lm_eval"] = "lm_eval"
    # lm-eval task name (looked up in the space's task_paths) or a path to a task YAML file.
    task: str = Field(min_length=1)
    # lm-eval metric key, "metric,filter" as lm-eval reports it (e.g. "exact_match,none").
    metric: str = Field(min_length=1)

    @property
    def metric_name(self) -> str:
        return self.metric.split(",")[0].strip()

    def is_bounded(self) -> bool:
        return self.metric_name in BOUNDED_METRICS

    def supports_fidelity(self) -> bool:
        return self.metric_name in FIDELITY_METRICS

    def fidelity_problem(self) -> str | None:
        if self.supports_fidelity():
            return None
        return f"is {self.metric} (metrics that are such a mean: {', '.join(sorted(FIDELITY_METRICS))})"

    def missing_reference(self, base_dir: Path | None, task_paths: Sequence[str]) -> tuple[str, str] | None:
        found, known = find_task(self.task, task_paths, base_dir)
        if found is not None:
            return None
        where = ", ".join(task_paths) if task_paths else "none given"
        return "task", (f"no task '{self.task}' in the task paths ({where}) nor a YAML file"
                        f" (known tasks: {', '.join(known) if known else 'none'})")

    def portable(self, resolve: Callable[[str], str]) -> LmEvalObjective:
        if self.task.endswith((".yaml", ".yml")):
            return self.model_copy(update={"task": resolve(self.task)})
        return self

    @classmethod
    def needs_evaluator(cls, objectives: Sequence[Objective], context: EvalContext) -> bool:
        # Task paths are checked at worker start even before an objective names one of their tasks.
        return bool(objectives) or bool(context.task_paths)

    @classmethod
    def evaluator(cls, context: EvalContext) -> KindEvaluator:
        # lm-eval, datasets and torch load only in processes that score lm-eval tasks.
        from evomerge.objectives.lm_eval_runner import LmEvalEvaluator

        return LmEvalEvaluator(context)


KIND = LmEvalObjective
