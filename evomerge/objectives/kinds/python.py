"""The ``python`` kind: a scorer function of the user's, called with the in-memory model and tokenizer.

``scorer: "package.module:function"`` (imported) or ``"path/to/file.py:function"`` (relative to the space
file). The worker calls ``function(model, tokenizer, indices=indices, args=args)`` in inference mode with a
fixed torch seed and expects one float per example: ``indices`` is a ``range`` of example numbers (the
first ``limit``, or a multi-fidelity slice of them) or None for all of the scorer's examples; ``args`` is
the objective's free-form ``args`` mapping. The objective's value is the mean of those scores; they are
stored per example like an lm-eval task's.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from evomerge.objectives.base import (
    EvalContext,
    EvaluationError,
    KindEvaluator,
    Objective,
    ObjectiveResult,
    Subset,
    Window,
)
from evomerge.objectives.tasks import resolve_path

SEED = 1234  # torch seed around every call, so a scorer that samples scores a model the same way each time
_SCORER = re.compile(r"^[^:\s][^:]*:[A-Za-z_]\w*$")


class PythonObjective(Objective):
    kind: Literal["python"] = "python"
    scorer: str
    # Passed to the scorer as it is (dataset paths, prompt settings, ...).
    args: dict[str, Any] = Field(default_factory=dict)
    # Every per-example score lies in [0, 1] (checked when scored): the value is then bounded, and
    # multi-fidelity can slice it when `limit` says how many examples a full evaluation scores.
    bounded: bool = False

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        if not _SCORER.match(v):
            raise ValueError("must be 'package.module:function' or 'path/to/file.py:function'")
        return v

    def is_bounded(self) -> bool:
        return self.bounded

    def supports_fidelity(self) -> bool:
        return self.bounded and self.limit is not None

    def fidelity_problem(self) -> str | None:
        if self.supports_fidelity():
            return None
        return "is a python scorer without bounded: true and a limit (its number of examples)"

    def missing_reference(self, base_dir: Path | None, task_paths: Sequence[str]) -> tuple[str, str] | None:
        module_ref = self.scorer.rpartition(":")[0]
        if module_ref.endswith(".py"):
            path = resolve_path(module_ref, base_dir)
            return None if path.is_file() else ("scorer", f"no scorer file {path}")
        # the top package only: finding a submodule would run the package's code on the driver
        top = module_ref.split(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else ("scorer", f"no module '{top}' to import (a file beside the space is "
                                             f"written '{module_ref.replace('.', '/')}.py:function')")

    def portable(self, resolve: Callable[[str], str]) -> PythonObjective:
        module, _, fn = self.scorer.rpartition(":")
        if module.endswith(".py"):
            return self.model_copy(update={"scorer": f"{resolve(module)}:{fn}"})
        return self

    @classmethod
    def evaluator(cls, context: EvalContext) -> KindEvaluator:
        return PythonEvaluator(context)


def load_scorer(ref: str, base_dir: str | Path | None = None) -> Callable[..., Sequence[float]]:
    """The function a ``scorer`` reference names (a ``.py`` path resolves against ``base_dir``)."""
    module_ref, _, name = ref.rpartition(":")
    if module_ref.endswith(".py"):
        path = resolve_path(module_ref, Path(base_dir) if base_dir is not None else None)
        if not path.is_file():
            raise EvaluationError(f"scorer '{ref}': no file {path}")
        key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(f"evomerge_scorer_{key}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise EvaluationError(f"scorer '{ref}': {path} fails to import: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as e:
            hint = f" (a file beside the space is written '{module_ref.replace('.', '/')}.py:{name}')"
            raise EvaluationError(f"scorer '{ref}': cannot import {module_ref}: {e}{hint}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise EvaluationError(f"scorer '{ref}': {module_ref} has no function {name}")
    return fn


class PythonEvaluator:
    """Calls each python objective's scorer on the model; scorers are imported once, at prepare."""

    def __init__(self, context: EvalContext) -> None:
        self.tokenizer = context.tokenizer
        self.base_dir = context.base_dir
        self._scorers: dict[str, Callable[..., Sequence[float]]] = {}

    def prepare(self, objectives: Sequence[Objective]) -> None:
        for o in objectives:
            assert isinstance(o, PythonObjective)
            if o.scorer not in self._scorers:
                self._scorers[o.scorer] = load_scorer(o.scorer, self.base_dir)

    def num_examples(self, objective: Objective) -> int:
        if objective.limit is None:
            raise EvaluationError(f"objective '{objective.name}': a python objective is sliced only with a limit")
        return objective.limit

    def evaluate(
        self, model: Any, objectives: Sequence[Objective], window: Window | None = None
    ) -> dict[str, ObjectiveResult]:
        import torch  # the scorer runs on the worker's torch model; the kind's spec stays free of torch

        self.prepare(objectives)
        out: dict[str, ObjectiveResult] = {}
        devices = [model.device] if getattr(getattr(model, "device", None), "type", None) == "cuda" else []
        for o in objectives:
            assert isinstance(o, PythonObjective)
            indices = _indices(o.limit, window)
            model.eval()
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(SEED)
                raw = self._scorers[o.scorer](model, self.tokenizer, indices=indices, args=dict(o.args))
            scores = _scores(o, raw, indices)
            out[o.name] = ObjectiveResult(sum(scores) / len(scores), scores)
        return out


def _indices(limit: int | None, window: Window | None) -> Sequence[int] | None:
    if window is None:
        return None if limit is None else range(limit)
    if isinstance(window, Subset):
        return [int(i) for i in window if limit is None or int(i) < limit]
    lo, hi = window
    return range(lo, hi if limit is None else min(hi, limit))


def _scores(o: PythonObjective, raw: Any, indices: Sequence[int] | None) -> list[float]:
    try:
        scores = [float(v) for v in raw]
    except (TypeError, ValueError):
        raise EvaluationError(f"objective '{o.name}': the scorer must return a list of numbers") from None
    if not scores:
        raise EvaluationError(f"objective '{o.name}': the scorer returned no scores")
    if indices is not None and len(scores) != len(indices):
        raise EvaluationError(
            f"objective '{o.name}': the scorer returned {len(scores)} scores for {len(indices)} examples"
        )
    if o.bounded and not all(0.0 <= s <= 1.0 for s in scores if not math.isnan(s)):
        raise EvaluationError(f"objective '{o.name}' is bounded but its scorer returned a score outside [0, 1]")
    return scores


KIND = PythonObjective
