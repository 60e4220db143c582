"""The evaluation worker: sources resident, one preallocated model, lm-eval in-process.

The same class runs in-process (tests, export checks) and as a Ray actor (``ray.remote`` applied
by the driver), so the evaluation path is one piece of code wherever it runs.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field

from evomerge.fidelity import (
    MultiFidelity,
    can_reach_front,
    estimate,
    estimate_bounds,
    optimistic_value,
)
from evomerge.genomes import cost_measure, materializer, recipe_from_json
from evomerge.objectives import Evaluator, ObjectiveResult, parse_objective, supports_fidelity
from evomerge.objectives.base import Subset
from evomerge.space import Objective


@dataclass
class WorkerConfig:
    base: str | None
    sources: list[str]
    objectives: list[dict]
    task_paths: list[str]
    batch_size: int = 32
    dtype: str = "float32"
    device: str | None = None  # None: cuda when this process sees a GPU, else cpu
    kind: str = "parameter_space"  # the genome kind (evomerge.genomes.KINDS), which builds the candidates
    # The space's genome block (its kind's spec, dumped): the kind's materializer reads what it needs.
    genome: dict = field(default_factory=dict)
    # Fused merge kernels (the space's evaluation.fused_kernels): "auto" (on for CUDA, the C kernels on CPU),
    # "on" (eager where torch.compile does not work) or "off". Data-flow workers ignore it.
    fused: str = "auto"


@dataclass
class EvalResult:
    number: int
    scores: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    worker: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class MergeWorker:
    """Holds base and task vectors resident; each call materializes one recipe and scores it."""

    def __init__(self, cfg: WorkerConfig):
        # torch and transformers load in the worker process only: the driver and the CLI stay light
        import torch
        from transformers import AutoTokenizer


        t0 = time.perf_counter()
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            # One Ray actor per core: more intra-op threads than that only fight each other.
            torch.set_num_threads(max(1, int(os.environ.get("EVOMERGE_THREADS", "1"))))
        dtype = getattr(torch, cfg.dtype)
        if cfg.fused not in ("auto", "on", "off"):
            raise ValueError(f"fused must be 'auto', 'on' or 'off', not {cfg.fused!r}")
        self.fused_setting = cfg.fused
        built = materializer(cfg.kind, cfg, device, dtype)
        self.materializer, tok_path = built.materializer, built.tokenizer_path
        self.merge_kernels, self.merge_kernels_note = built.merge_kernels, built.note
        self.model = self.materializer.new_model()
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        self.objectives = [parse_objective(o) for o in cfg.objectives]
        self.evaluator = Evaluator(
            self.objectives, cfg.task_paths, self.tokenizer, cfg.batch_size, measure=cost_measure
        )
        self.name = f"{socket.gethostname()}:{os.getpid()}:{device}"
        self.startup_s = time.perf_counter() - t0

    def info(self) -> dict:
        """Who the worker is, how long it took to start, and how it merges: ``merge_kernels`` is "fused",
        "native" (the C kernels) or "eager" (what ``fused_kernels``, the space's setting, came to here;
        ``merge_kernels_note`` says why)."""
        return {
            "worker": self.name,
            "startup_s": self.startup_s,
            "fused_kernels": self.fused_setting,
            "merge_kernels": self.merge_kernels,
            "merge_kernels_note": self.merge_kernels_note,
        }

    def evaluate(
        self,
        number: int,
        recipe_json: str,
        objective_names: list[str] | None = None,
        front: list[list[float]] | None = None,
        fidelity: dict | None = None,
    ) -> dict:
        """Score one candidate; an exception becomes an error string (a deterministic failure).

        With ``fidelity`` (a MultiFidelity dict) and the current ``front`` (values of the objectives, in
        order), a first slice is scored and the rest only when the candidate can still reach the front.
        """
        res = EvalResult(number=number, worker=self.name)
        try:
            recipe = recipe_from_json(recipe_json)
            t0 = time.perf_counter()
            self.materializer.apply(recipe, self.model)
            t1 = time.perf_counter()
            objs = self.objectives
            if objective_names is not None:
                objs = [o for o in self.objectives if o.name in objective_names]
            if fidelity is not None and front:
                settings = {k: v for k, v in fidelity.items() if k not in ("anchors", "reference")}
                fid = MultiFidelity.model_validate(settings)
                if fid.method == "anchors":
                    out, extra = self._anchored(objs, front, fid, fidelity.get("anchors") or {},
                                                fidelity.get("reference"))
                else:
                    out, extra = self._staged(objs, front, fid, fidelity.get("reference"))
            else:
                out, extra = self.evaluator.evaluate(self.model, objs), {}
            t2 = time.perf_counter()
            res.timings = {"materialize_s": t1 - t0, "evaluate_s": t2 - t1, **extra}
            for name, r in out.items():
                res.scores[name] = float(r.value)
                res.samples[name] = [float(v) for v in r.samples]
            bad = [n for n, v in res.scores.items() if not math.isfinite(v)]
            if bad:
                res.error = f"non-finite score for {', '.join(bad)}"
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the search goes on
            tb = traceback.format_exc(limit=3)
            res.error = f"{type(e).__name__}: {e}\n{tb}"
        return res.to_dict()

    def _anchored(self, objs: list[Objective], front: list[list[float]], fid: MultiFidelity, plan: dict,
                  reference: list[float] | None = None):
        """Anchors first (``plan``: per objective its anchors, weights and error bar, from the driver); the
        rest only when the estimate plus ``z`` error bars could reach the front. With ``confirm``, a candidate
        passing that gate (at half of ``min_gain``) is scored on the plan's larger subset first and finished only
        when that estimate plus ``confirm_z`` error bars could reach it (with ``confirm_steps``, through the
        plan's ``between`` subsets, each gated like the anchors). Without a plan for an objective (too few
        fully scored candidates yet) it is scored in full."""
        staged = [o for o in objs if supports_fidelity(o) and o.name in plan]
        if not staged:
            return self.evaluator.evaluate(self.model, objs), {"fidelity": 1.0}
        n = {o.name: self.evaluator.num_docs(o) for o in staged}
        for o in staged:
            if int(plan[o.name]["n"]) != n[o.name]:
                raise ValueError(f"objective '{o.name}': the anchor plan is for {plan[o.name]['n']} examples, "
                                 f"the task has {n[o.name]}")
        out: dict[str, ObjectiveResult] = {}
        rest = [o for o in objs if o not in staged]
        if rest:
            out.update(self.evaluator.evaluate(self.model, rest))
        # Each stage: the subsets to score (each holding the one before), its error bars of optimism and the
        # share of the front's hypervolume it must add. The anchors alone, or they screen and confirm decides.
        first = {o.name: plan[o.name] for o in staged}
        stages = [(first, fid.z, fid.min_gain)]
        if fid.confirm is not None:
            steps = min(len(plan[o.name].get("between") or []) for o in staged)
            stages = [(first, fid.z, fid.min_gain / 2),
                      *(({o.name: plan[o.name]["between"][i] for o in staged}, fid.z, fid.min_gain / 2)
                        for i in range(steps)),
                      ({o.name: plan[o.name].get("confirm") or plan[o.name] for o in staged}, fid.confirm_z,
                       fid.min_gain)]
        dirs = [o.direction for o in objs]
        scores: dict[str, dict[int, float]] = {o.name: {} for o in staged}
        for entries, z, gain in stages:
            for o in staged:  # the examples of this stage's subset not scored yet
                more = [int(i) for i in entries[o.name]["indices"] if int(i) not in scores[o.name]]
                if more:
                    r = self.evaluator.evaluate(self.model, [o], window=Subset(more))[o.name]
                    scores[o.name].update(zip(more, r.samples, strict=True))
            est = {o.name: estimate(entries[o.name], [scores[o.name][int(i)] for i in entries[o.name]["indices"]])
                   for o in staged}
            optimistic = [estimate_bounds(est[o.name], float(entries[o.name]["error"]), z, o.direction)
                          if o.name in est else out[o.name].value for o in objs]
            bar = sum(float(entries[o.name]["error"]) for o in staged) / len(staged)
            if not can_reach_front(optimistic, front, dirs, gain, reference):
                for o in staged:  # the estimate stands for the score; its anchor scores are no per-example list
                    out[o.name] = ObjectiveResult(est[o.name], [])
                seen = sum(len(scores[o.name]) for o in staged)
                return {o.name: out[o.name] for o in objs}, {"fidelity": seen / sum(n.values()), "pruned": 1.0,
                                                              "estimated": 1.0, "error_bar": bar}
        errors = []
        for o in staged:
            others = Subset(i for i in range(n[o.name]) if i not in scores[o.name])
            if others:
                r = self.evaluator.evaluate(self.model, [o], window=others)[o.name]
                scores[o.name].update(zip(others, r.samples, strict=True))
            samples = [scores[o.name][i] for i in range(n[o.name])]
            out[o.name] = ObjectiveResult(float(sum(samples) / len(samples)), samples)
            errors.append(abs(est[o.name] - out[o.name].value))
        return {o.name: out[o.name] for o in objs}, {"fidelity": 1.0, "anchor_error": sum(errors) / len(errors),
                                                      "error_bar": bar}

    def _staged(self, objs: list[Objective], front: list[list[float]], fid: MultiFidelity,
                reference: list[float] | None = None):
        """Slice first, then the rest if the optimistic scores are not dominated by the front."""
        staged = [o for o in objs if supports_fidelity(o)]
        if not staged:
            return self.evaluator.evaluate(self.model, objs), {"fidelity": 1.0}
        n = {o.name: self.evaluator.num_docs(o) for o in staged}
        k = max(1, math.ceil(fid.fraction * max(n.values())))
        first = self.evaluator.evaluate(self.model, objs, window=(0, k))
        seen = sum(len(first[o.name].samples) for o in staged)
        full = sum(n.values())
        optimistic = [
            optimistic_value(first[o.name].samples, n[o.name], o.direction, fid) if o.name in n
            else first[o.name].value
            for o in objs
        ]
        if not can_reach_front(optimistic, front, [o.direction for o in objs], fid.min_gain, reference):
            # a slice mean stands for the full score: an estimate, never a front member (with ``min_gain`` it
            # need not be dominated)
            return first, {"fidelity": seen / full, "pruned": 1.0, "estimated": 1.0}
        todo = [o for o in staged if n[o.name] > k]
        rest = self.evaluator.evaluate(self.model, todo, window=(k, max(n.values()))) if todo else {}
        out = dict(first)
        for o in todo:
            samples = first[o.name].samples + rest[o.name].samples
            out[o.name] = ObjectiveResult(float(sum(samples) / len(samples)), samples)
        return out, {"fidelity": 1.0}
