"""The ``lm_eval`` kind's evaluator: an in-memory model scored on lm-eval tasks, in-process.

One :class:`LmEvalEvaluator` lives as long as its worker (the offline flags are set when this module
loads). At construction it builds one ``lm_eval.tasks.TaskManager(include_defaults=False,
include_path=<task dirs>)``; preparing an objective resolves its task, loads its data once (into a
private ``datasets`` cache) and checks that the metric exists. Each :meth:`LmEvalEvaluator.evaluate`
call then runs every lm-eval objective of that call in one ``lm_eval.evaluator.evaluate`` pass over the
already-built task objects (no dataset reload, no request cache, no stderr bootstrap, no git/env
probing) through one ``HFLM`` per model object, reused across calls: the worker writes each candidate
into the same preallocated model in place, and nothing in that path caches model outputs between calls
(``cache_requests=False``, no ``CachingLM``).

Speed: on CPU, give torch one thread per core the worker owns (``torch.set_num_threads``); tiny
models run many times slower when torch's threads contend with other processes for the cores.

Task YAML conventions (what the task files in a space's ``task_paths`` must follow)
-------------------------------------------------------------------------------------
* Local data only: ``dataset_path: json`` (or csv/parquet) and ``dataset_kwargs: {data_files: {test:
  data/x.jsonl}}``. Relative ``data_files`` / ``data_dir`` are relative to the directory of the YAML
  file that names the task (falling back to the directories of the files it ``include:``-s), never to
  the current directory: the evaluator rewrites them to absolute paths, so it works from any cwd.
* Shared settings may live in an include file without a ``task:`` key (lm-eval's
  ``_default_template_yaml`` convention); ``!function module.fn`` resolves next to the YAML file.
* An objective names one task (not a group or tag) and a metric as lm-eval reports it,
  ``"metric,filter"`` (``exact_match,none``; ``exact_match,strict-match`` for a filter named
  ``strict-match``).
* Generation tasks with the project's character tokenizers: the prompt (``doc_to_text``) ends exactly
  where the answer begins, the answer (``doc_to_target``) has no leading space, ``target_delimiter: ""``
  (lm-eval's default ``" "`` would put a space between question and answer in few-shot examples),
  ``fewshot_delimiter: "\\n"``, ``generation_kwargs: {until: ["\\n"], do_sample: false, max_gen_toks:
  <longest answer + 1 or so>}``. A model trained on ``prompt + answer + "\\n"`` then scores
  ``exact_match`` 1.0 when right. Whether a BOS token is prepended is the tokenizer's own choice
  (its post-processor, ``add_special_tokens=True``): train with the same encoding. ``max_gen_toks``
  bounds the time of every call (a wrong model generates that many tokens per example): keep it small.
* Answers are stored as strings in the data file (``"target": "47"``, not ``47``), and a plain column
  name (``doc_to_text: prompt``, ``doc_to_target: target``) is cheaper than a Jinja template
  (``"{{prompt}}"``) though both work (compiled templates are memoised here).
* The model's ``generation_config.max_new_tokens`` is ignored during evaluation: the task's
  ``max_gen_toks`` decides.
* Per-example scores are the logged sample values of the objective's metric under its filter, in
  document order. Metrics whose per-example value is not a number (corpus-level metrics such as BLEU)
  give an empty ``samples`` list; their aggregate is still the value.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# datasets and huggingface_hub read these when they are first imported: set them before lm-eval imports them.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE_ENV)

import torch  # noqa: E402
import yaml  # noqa: E402
from lm_eval.evaluator import evaluate as lm_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._index import Kind, TaskIndex  # noqa: E402
from lm_eval.tasks._yaml_loader import _make_loader, load_yaml  # noqa: E402

from evomerge.objectives import lm_eval_patches  # noqa: E402
from evomerge.objectives.base import (  # noqa: E402
    EvalContext,
    EvaluationError,
    Objective,
    ObjectiveResult,
    Window,
    window_indices,
)
from evomerge.objectives.tasks import resolve_path, task_file  # noqa: E402

if TYPE_CHECKING:  # the kind module imports this one when it builds an evaluator
    from evomerge.objectives.kinds.lm_eval import LmEvalObjective

DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
DEFAULT_TORCH_SEED = 1234  # lm-eval's default torch seed (matters only for sampling tasks)


@dataclass
class _TaskSlot:
    name: str  # lm-eval task name
    task: Any  # lm_eval.api.task.Task, built once
    n_docs: int
    source: str  # the YAML file it came from


def _split_metric(metric: str) -> tuple[str, str]:
    name, sep, flt = metric.partition(",")
    return name.strip(), (flt.strip() if sep else "none")


def _include_dirs(yaml_path: Path, seen: set[Path] | None = None) -> list[Path]:
    """The YAML file's directory, then those of the files it includes (depth first)."""
    seen = seen if seen is not None else set()
    yaml_path = yaml_path.resolve()
    if yaml_path in seen:
        return []
    seen.add(yaml_path)
    dirs = [yaml_path.parent]
    try:
        with yaml_path.open("rb") as fh:
            raw = yaml.load(fh, Loader=_make_loader(yaml_path.parent, resolve_funcs=False))  # noqa: S506
    except Exception:  # noqa: BLE001
        return dirs
    inc = raw.get("include") if isinstance(raw, dict) else None
    for item in inc if isinstance(inc, list) else ([inc] if inc else []):
        p = Path(item)
        p = p if p.is_absolute() else yaml_path.parent / p
        for d in _include_dirs(p, seen):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _absolute(value: Any, dirs: Sequence[Path], task: str, key: str) -> Any:
    """Make the local path(s) in a data_files / data_dir value absolute (against ``dirs``)."""
    if isinstance(value, dict):
        return {k: _absolute(v, dirs, task, key) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_absolute(v, dirs, task, key) for v in value]
    if not isinstance(value, (str, os.PathLike)):
        return value
    s = str(value)
    if "://" in s:  # a URL (hf://, https://): leave it to datasets
        return s
    p = Path(s).expanduser()
    if p.is_absolute():
        return str(p)
    for d in dirs:
        cand = d / p
        if cand.exists() or any(ch in s for ch in "*?["):
            return str(cand.resolve())
    raise EvaluationError(f"task '{task}': {key} '{s}' not found next to its YAML file ({dirs[0]})")


class LmEvalEvaluator:
    """Evaluates in-memory models on lm-eval objectives; build one per worker (the kind does, from its context).

    The context's ``task_paths``: directories (searched recursively for ``*.yaml``) or single YAML files
    defining the tasks; ``tokenizer``: the tokenizer object the models use; ``batch_size``: HFLM batch size (an
    int; lm-eval ignores the evaluator's batch size for in-memory models); ``cache_dir``: where ``datasets``
    caches the parsed data files, a private temporary directory (removed at exit) when None; ``base_dir``:
    what relative task paths and YAML task references resolve against (the space file's directory), the
    current directory when None (a relative YAML reference not found there is also looked up in the task
    directories and their parents).
    """

    def __init__(
        self,
        context: EvalContext,
        *,
        fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
        torch_seed: int = DEFAULT_TORCH_SEED,
    ) -> None:
        cache_dir = context.cache_dir
        if cache_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="evomerge-eval-")
            atexit.register(shutil.rmtree, self._tmp, True)
            cache_dir = self._tmp
        else:
            self._tmp = None
        self.cache_dir = str(Path(cache_dir).expanduser().resolve())
        os.makedirs(self.cache_dir, exist_ok=True)
        os.environ.setdefault("HF_HOME", os.path.join(self.cache_dir, "hf_home"))
        os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(self.cache_dir, "datasets"))
        self._datasets_cache = os.path.join(self.cache_dir, "datasets")
        lm_eval_patches.apply(quiet=context.quiet)

        batch_size = context.batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.tokenizer = context.tokenizer
        self.batch_size = batch_size
        self.fewshot_seed = fewshot_seed
        self.torch_seed = torch_seed
        self.quiet = context.quiet

        base_dir = context.base_dir
        self.base_dir = Path(base_dir).expanduser().resolve() if base_dir is not None else None
        dirs: list[str] = []
        self._yaml_files: dict[str, Path] = {}  # task name -> YAML file given directly in task_paths
        for tp in context.task_paths:
            p = resolve_path(tp, self.base_dir)
            if p.is_dir():
                dirs.append(str(p))
            elif p.is_file() and p.suffix in (".yaml", ".yml"):
                name = self._task_name_of(p)
                if name:
                    self._yaml_files[name] = p
            else:
                raise EvaluationError(f"task path '{tp}' is neither a directory nor a YAML file")
        self._task_dirs = [Path(d) for d in dirs]
        self.task_manager = TaskManager(include_defaults=False, include_path=dirs or None)
        self._slots: dict[str, _TaskSlot] = {}  # objective.task reference -> built task
        self._lm: Any = None
        self._lm_model_ref: Any = None

    # ------------------------------------------------------------------ task resolution

    @staticmethod
    def _task_name_of(path: Path) -> str | None:
        try:
            entry = TaskIndex.entry_from_path(path)
        except Exception as e:  # noqa: BLE001
            raise EvaluationError(f"task file '{path}' cannot be read: {e}") from e
        return entry.name if entry else None

    def known_tasks(self) -> list[str]:
        idx = self.task_manager.task_index
        names = {n for n, e in idx.items() if e.kind in (Kind.TASK, Kind.PY_TASK)}
        return sorted(names | set(self._yaml_files))

    def _find_yaml(self, ref: str) -> Path:
        if ref in self._yaml_files:
            return self._yaml_files[ref]
        entry = self.task_manager.task_index.get(ref)
        if entry is not None:
            if entry.kind not in (Kind.TASK,) or entry.yaml_path is None:
                raise EvaluationError(
                    f"task '{ref}' is a {entry.kind.name.lower()}; an objective must name one YAML task"
                )
            return Path(entry.yaml_path)
        found = task_file(ref, self._task_dirs, self.base_dir)
        if found is not None:
            return found
        known = self.known_tasks()
        raise EvaluationError(
            f"unknown task '{ref}': not a task in the task paths nor a YAML file"
            f" (known tasks: {', '.join(known) if known else 'none'})"
        )

    def _task_config(self, yaml_path: Path) -> dict[str, Any]:
        cfg = deepcopy(load_yaml(yaml_path, resolve_func=True))
        name = cfg.get("task")
        if not isinstance(name, str) or "group" in cfg or "class" in cfg:
            raise EvaluationError(f"'{yaml_path}' does not define a single YAML task")
        dirs = _include_dirs(yaml_path)
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        for key in ("data_files", "data_dir"):
            if kwargs.get(key) is not None:
                kwargs[key] = _absolute(kwargs[key], dirs, name, key)
        dpath = cfg.get("dataset_path")
        if isinstance(dpath, str) and dpath.startswith(("./", "../")):
            cfg["dataset_path"] = _absolute(dpath, dirs, name, "dataset_path")
        kwargs.setdefault("cache_dir", self._datasets_cache)
        cfg["dataset_kwargs"] = kwargs
        cfg.pop("tag", None)
        return cfg

    def prepare(self, objectives: Iterable[Objective]) -> None:
        """Resolve, load and check the tasks of these objectives (done once per task)."""
        objectives = [o for o in objectives if o.kind == "lm_eval"]
        by_name = {sl.name: sl for sl in self._slots.values()}
        new: dict[str, tuple[dict[str, Any], Path]] = {}  # task name -> (config, YAML file)
        refs: dict[str, str] = {}  # objective reference -> task name
        for o in objectives:
            if o.task in self._slots or o.task in refs:
                continue
            path = self._find_yaml(o.task)
            cfg = self._task_config(path)
            name = cfg["task"]
            known = by_name[name].source if name in by_name else (str(new[name][1]) if name in new else None)
            if known is not None and known != str(path):
                raise EvaluationError(f"task '{name}' is defined twice: in {known} and in {path}")
            if name not in by_name:
                new.setdefault(name, (cfg, path))
            refs[o.task] = name
        if new:
            try:
                loaded = self.task_manager.load([cfg for cfg, _ in new.values()])
            except Exception as e:
                raise EvaluationError(f"lm-eval could not build tasks {sorted(new)}: {e}") from e
            for name, (_, path) in new.items():
                task = loaded["tasks"][name]
                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                by_name[name] = _TaskSlot(name, task, len(task.eval_docs), str(path))
        for ref, name in refs.items():
            self._slots[ref] = by_name[name]
        for o in objectives:
            self._check_metric(o)

    def _check_metric(self, o: LmEvalObjective) -> None:
        slot = self._slots[o.task]
        metric, flt = _split_metric(o.metric)
        metrics = set(getattr(slot.task, "_metric_fn_list", {}) or {})
        filters = {f.name for f in getattr(slot.task, "_filters", [])}
        if metrics and metric not in metrics:
            raise EvaluationError(
                f"objective '{o.name}': task '{slot.name}' has no metric '{metric}'"
                f" (its metrics: {', '.join(sorted(metrics))}; write the metric as 'metric,filter')"
            )
        if filters and flt not in filters:
            raise EvaluationError(
                f"objective '{o.name}': task '{slot.name}' has no filter '{flt}' for metric '{o.metric}'"
                f" (its filters: {', '.join(sorted(filters))})"
            )

    # ------------------------------------------------------------------ evaluation

    def _lm_for(self, model: Any) -> Any:
        ref = self._lm_model_ref() if self._lm_model_ref is not None else None
        if ref is not model:
            self._lm = _make_hflm(model, self.tokenizer, self.batch_size, self.quiet)
            self._lm_model_ref = weakref.ref(model)
        model.eval()
        return self._lm

    def num_examples(self, objective: Objective) -> int:
        """How many examples a full evaluation of ``objective`` scores (its limit, or the whole split)."""
        assert objective.kind == "lm_eval"
        self.prepare([objective])
        n = self._slots[objective.task].n_docs
        return n if objective.limit is None else min(objective.limit, n)

    def evaluate(
        self, model: Any, objectives: Sequence[Objective], window: Window | None = None
    ) -> dict[str, ObjectiveResult]:
        """Scores of ``model`` on these lm-eval objectives, keyed by objective name, in one lm-eval pass.

        ``window=(a, b)`` scores only examples ``a <= i < b`` of each objective's documents (clipped to its
        limit); the value is then the task's aggregation over the window. NaN / infinite values come back as
        they are. A metric missing from lm-eval's results raises :class:`EvaluationError`.
        """
        objs = [o for o in objectives if o.kind == "lm_eval"]
        if not objs:
            return {}
        self.prepare(objs)
        return self._run_lm_eval(model, objs, window)

    def _run_lm_eval(
        self, model: Any, objs: list[LmEvalObjective], window: Window | None = None
    ) -> dict[str, ObjectiveResult]:
        # Per task: how many documents (None = all) -- the largest any objective asks for.
        n_for: dict[str, int | None] = {}
        slot_of: dict[str, _TaskSlot] = {}
        for o in objs:
            slot = self._slots[o.task]
            slot_of[slot.name] = slot
            want = None if o.limit is None else min(o.limit, slot.n_docs)
            if slot.name not in n_for:
                n_for[slot.name] = want
            else:
                cur = n_for[slot.name]
                n_for[slot.name] = None if cur is None or want is None else max(cur, want)
        if window is None:
            samples = {
                name: _Indices(range(n))
                for name, n in n_for.items()
                if n is not None and n < slot_of[name].n_docs
            }
        else:
            samples = {
                name: _Indices(window_indices(window, slot_of[name].n_docs if n is None else n))
                for name, n in n_for.items()
            }
            if any(len(v) == 0 for v in samples.values()):
                raise EvaluationError(f"window {window} holds no example of some task")
        tasks = {name: slot_of[name].task for name in n_for}
        for t in tasks.values():
            t.set_fewshot_seed(seed=self.fewshot_seed)
        lm = self._lm_for(model)
        devices = (
            [model.device]
            if getattr(model, "device", None) is not None and model.device.type == "cuda"
            else []
        )
        # A model's own generation_config.max_new_tokens would override the task's max_gen_toks
        # (lm-eval passes max_length); the task decides, so hide it for the call.
        gen_cfg = getattr(model, "generation_config", None)
        saved_max_new = getattr(gen_cfg, "max_new_tokens", None)
        if saved_max_new is not None:
            gen_cfg.max_new_tokens = None
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                if self.torch_seed is not None:
                    torch.manual_seed(self.torch_seed)
                res = lm_evaluate(
                    lm=lm,
                    task_dict={"tasks": tasks, "groups": {}, "group_map": {}},
                    limit=None,
                    samples=samples or None,
                    cache_requests=False,  # requests are rebuilt from the loaded docs each call
                    bootstrap_iters=0,  # no stderr: we report values and per-example scores
                    log_samples=True,
                )
        finally:
            if saved_max_new is not None:
                gen_cfg.max_new_tokens = saved_max_new
            for t in tasks.values():  # drop this call's requests and responses
                t._instances = None
        results, logged = res["results"], res.get("samples") or {}

        out: dict[str, ObjectiveResult] = {}
        for o in objs:
            slot = self._slots[o.task]
            metric, flt = _split_metric(o.metric)
            key = f"{metric},{flt}"
            task_res = results.get(slot.name, {})
            if key not in task_res:
                have = sorted(k for k in task_res if "_stderr" not in k and k != "alias" and "," in k)
                raise EvaluationError(
                    f"objective '{o.name}': lm-eval reported no '{key}' for task '{slot.name}'"
                    f" (it reported: {', '.join(have) or 'nothing'})"
                )
            rows = sorted(
                (s for s in logged.get(slot.name, []) if s.get("filter") == flt),
                key=lambda s: s["doc_id"],
            )
            per = _numbers([s.get(metric) for s in rows])
            n_run = len(rows)
            value = _as_float(task_res[key])
            n_o = slot.n_docs if o.limit is None else min(o.limit, slot.n_docs)
            if window is not None or n_o < n_run:
                allowed = frozenset(window_indices(window, n_o))
                keep = [i for i, s in enumerate(rows) if s["doc_id"] in allowed]
                rows = [rows[i] for i in keep]
                per = [per[i] for i in keep] if per else per
                agg = slot.task.aggregation().get(metric)
                value = _as_float(agg([s.get(metric) for s in rows])) if agg and rows else math.nan
            out[o.name] = ObjectiveResult(value, per)
        return out


class _Indices(list):
    """A list of document indices with O(1) membership (lm-eval tests ``i in samples`` per document)."""

    def __init__(self, it: Iterable[int]) -> None:
        super().__init__(it)
        self._set = frozenset(self)

    def __contains__(self, x: object) -> bool:
        return x in self._set


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _numbers(values: list[Any]) -> list[float]:
    out: list[float] = []
    for v in values:
        if isinstance(v, bool) or isinstance(v, (int, float)):
            out.append(float(v))
        else:
            try:
                out.append(float(v))
            except (TypeError, ValueError):
                return []  # not a per-example number (a corpus-level metric)
    return out


def _make_hflm(model: Any, tokenizer: Any, batch_size: int, quiet: bool) -> Any:
    return lm_eval_patches.hflm_class(quiet)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
