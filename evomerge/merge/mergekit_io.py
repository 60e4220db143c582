"""mergekit configs in: a mergekit YAML translated into a :class:`~evomerge.recipe.Recipe`.

- :func:`load_merge_config` reads what ``evomerge merge CONFIG`` is given: an evomerge recipe (JSON) or
  a mergekit YAML, which :func:`mergekit_to_recipe` translates into a recipe with mergekit's
  semantics (per-layer gradients, ``filter:`` conditions, parameter precedence, mergekit's per-method
  defaults written out explicitly, ``slices:``). :mod:`evomerge.merge.build` then merges it with the
  :class:`~evomerge.merge.Materializer`, the search's own engine.
- :mod:`evomerge.merge.mergekit_export` goes the other way (recipe to mergekit YAML).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from evomerge.files import UnreadableFile, read_user_text
from evomerge.merge.checkpoint import LAYER_NAME_RE, checkpoint_names, config_layers, model_path, read_config
from evomerge.merge.lora import is_lora_adapter
from evomerge.merge.mergekit_settings import (
    MERGEKIT_DEFAULTS,
    ConfigError,
    block_t,
    filters_in,
    input_params,
    number,
    resolve_setting,
    takes_slices,
)
from evomerge.merge.operators import ALIASES, OPERATORS, REQUIRED, OperatorSpec
from evomerge.recipe import LayerGroup, LayerSlice, Recipe, SliceSource, tensor_slot

__all__ = [
    "MergeJob",
    "config_of",
    "dtype_of",
    "load_merge_config",
    "mergekit_to_recipe",
]

_IGNORED_SHARED = {"int8_mask"}  # only the mask's storage dtype: no effect on the result
_TOP_FIELDS = {"models", "slices", "merge_method", "base_model", "dtype", "out_dtype", "tokenizer_source", "parameters"}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}  # fmt: skip


@dataclass
class MergeJob:
    """What ``evomerge merge`` builds: the recipe and the output options around it."""

    recipe: Recipe
    out_dtype: str | None = None  # output dtype (None: the base checkpoint's)
    tokenizer_source: str | None = None  # model folder to copy the tokenizer from (None: the base)
    source_text: str | None = None  # the mergekit YAML it came from, kept beside the output
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# reading configs


def load_merge_config(path: str | Path) -> MergeJob:
    """Read ``evomerge merge``'s CONFIG: an evomerge recipe (JSON) or a mergekit YAML."""
    p = Path(path)
    try:
        text = read_user_text(p)
    except UnreadableFile as e:
        raise ConfigError(f"{p}: {e}") from None
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            recipe = Recipe.from_json(text)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "<root>"
            raise ConfigError(f"{p}: field '{loc}': {err['msg']}") from None
        return MergeJob(recipe=recipe)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{p}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    except ValueError as e:  # Python refuses to read an integer of thousands of digits
        raise ConfigError(f"{p}: not valid YAML: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a mergekit config must be a mapping")
    if "merge_method" not in data and "method" in data and "groups" in data:
        raise ConfigError(f"{p}: an evomerge recipe must be JSON")
    for key in ("models", "slices"):
        if data.get(key) is not None and not isinstance(data[key], list):
            raise ConfigError(f"{p}: {key}: must be a list")
    try:
        job = mergekit_to_recipe(data, config_dir=p.parent)
    except (TypeError, AttributeError) as e:  # a value of the wrong type deep in the config: one line
        raise ConfigError(f"{p}: a value has the wrong type ({str(e).splitlines()[0] if str(e) else e!r})") from None
    job.source_text = text
    return job


def _model_ref(value: Any, where: str, config_dir: Path | None) -> str:
    """A mergekit model reference as a local path (``model+adapter`` kept as such)."""
    lora = None
    if isinstance(value, dict):
        extra = set(value) - {"model", "lora", "path", "revision", "override_architecture"}
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]}: not supported")
        if value.get("override_architecture"):
            raise ConfigError(f"{where}.override_architecture: not supported")
        if "path" in value:
            value = {"model": value}
        inner = value.get("model")
        lora = value.get("lora")
        if isinstance(inner, dict):
            if inner.get("revision"):
                raise ConfigError(f"{where}.revision: revisions need the model hub; give a local folder")
            inner = inner.get("path")
        if isinstance(lora, dict):
            lora = lora.get("path")
        value = inner
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: a model reference must be a path")
    if lora is None and "+" in value and not Path(value).exists():
        value, _, lora = value.partition("+")
    if "@" in value and not Path(value).exists():
        raise ConfigError(f"{where}: {value!r}: revisions ('@...') need the model hub; give a local folder")
    path = _local(value, where, config_dir)
    if lora is not None:
        return f"{path}+{_local(str(lora), where, config_dir)}"
    return path


def _local(ref: str, where: str, config_dir: Path | None) -> str:
    if ref.startswith("zoo://"):
        return model_path(ref)
    p = Path(ref).expanduser()
    cands = [p] if p.is_absolute() else [Path.cwd() / p] + ([config_dir / p] if config_dir else [])
    for c in cands:
        if c.is_dir():
            return str(c.resolve())
    raise ConfigError(
        f"{where}: {ref!r} is not a local model folder (evomerge merge reads local folders; hub ids are not downloaded)"
    )


def _model_layers(path: str, adapter_layers: int | None = None) -> int:
    p = path.split("+")[0] if not Path(path).exists() else path
    if is_lora_adapter(p):
        if adapter_layers is not None:  # an adapter source has the layers of the base it adapts
            return adapter_layers
        cfg = json.loads((Path(p) / "adapter_config.json").read_text())
        raise ConfigError(
            f"{p}: a LoRA adapter is a source, not a model with layers (base model "
            f"{cfg.get('base_model_name_or_path')!r}); use it in `models:` with a base_model"
        )
    n = config_layers(config_of(p))
    if n is None:
        raise ConfigError(f"{p}: config has no num_hidden_layers")
    return n


def config_of(path: str) -> dict[str, Any]:
    """:func:`~evomerge.merge.checkpoint.read_config`, its errors as :class:`ConfigError`."""
    try:
        return read_config(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{where}{'.' if where else ''}{k}: not supported by evomerge merge")


def _evomerge_spec(method: str) -> OperatorSpec:
    for spec in OPERATORS.values():
        if spec.mergekit_method == method:
            return spec
    key = ALIASES.get(method, method)
    if key in OPERATORS and method in MERGEKIT_DEFAULTS:
        return OPERATORS[key]
    known = sorted({s.mergekit_method for s in OPERATORS.values() if s.mergekit_method})
    raise ConfigError(f"merge_method: mergekit method {method!r} is not supported (supported: {', '.join(known)})")


def mergekit_to_recipe(config: dict, *, config_dir: str | Path | None = None) -> MergeJob:
    """Translate a mergekit config (the parsed YAML) into an evomerge recipe with the same result."""
    config_dir = Path(config_dir) if config_dir is not None else None
    _check_keys(config, _TOP_FIELDS, "")
    method = config.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError("merge_method: required (a mergekit method name)")
    spec = _evomerge_spec(method)
    has_models, has_slices = bool(config.get("models")), bool(config.get("slices"))
    if has_models == has_slices:
        raise ConfigError("models/slices: give exactly one of 'models' or 'slices'")
    for key in ("dtype", "out_dtype"):
        if config.get(key) is not None and str(config[key]) not in _DTYPES:
            raise ConfigError(f"{key}: unknown dtype {config[key]!r} (float32, float16, bfloat16)")
    out_dtype = config.get("out_dtype") or config.get("dtype")
    gparams = config.get("parameters") or {}
    if not isinstance(gparams, dict):
        raise ConfigError("parameters: must be a mapping")
    base_model = _model_ref(config["base_model"], "base_model", config_dir) if config.get("base_model") else None

    # normalise both forms to mergekit's: a list of output slices of (model, range, params) inputs
    slices: list[dict] = []
    if has_models:
        entries = []
        for i, m in enumerate(config["models"]):
            where = f"models[{i}]"
            if not isinstance(m, dict) or "model" not in m:
                raise ConfigError(f"{where}.model: required")
            _check_keys(m, {"model", "parameters"}, where)
            ref = _model_ref(m["model"], f"{where}.model", config_dir)
            entries.append({"model": ref, "params": m.get("parameters") or {}, "range": None, "where": where})
        slices.append({"sources": entries, "params": {}, "base": None, "where": "models"})
    else:
        for i, sl in enumerate(config["slices"]):
            where = f"slices[{i}]"
            if not isinstance(sl, dict) or not sl.get("sources"):
                raise ConfigError(f"{where}.sources: required")
            _check_keys(sl, {"sources", "parameters", "base_model"}, where)
            entries = []
            for j, src in enumerate(sl["sources"]):
                w2 = f"{where}.sources[{j}]"
                if not isinstance(src, dict) or "model" not in src:
                    raise ConfigError(f"{w2}.model: required")
                _check_keys(src, {"model", "layer_range", "parameters"}, w2)
                lr = src.get("layer_range")
                if not (isinstance(lr, (list, tuple)) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
                    raise ConfigError(f"{w2}.layer_range: required, [start, end] with integers")
                if not 0 <= lr[0] < lr[1]:
                    raise ConfigError(f"{w2}.layer_range: need 0 <= start < end, got {list(lr)}")
                ref = _model_ref(src["model"], f"{w2}.model", config_dir)
                entries.append({"model": ref, "params": src.get("parameters") or {}, "range": tuple(lr), "where": w2})
            if len({e["range"][1] - e["range"][0] for e in entries}) != 1:
                raise ConfigError(f"{where}.sources: all sources of a slice must span the same number of layers")
            sbase = _model_ref(sl["base_model"], f"{where}.base_model", config_dir) if sl.get("base_model") else None
            slices.append({"sources": entries, "params": sl.get("parameters") or {}, "base": sbase, "where": where})

    stored = takes_slices(spec)  # mergekit's passthrough: one model per slice, no base
    needs_base = spec.needs_base and not stored
    if needs_base and base_model is None and not any(s["base"] for s in slices):
        raise ConfigError(f"base_model: merge_method {method!r} needs a base model")
    n_models = spec.mergekit_models
    if n_models is not None:
        for s in slices:
            if not needs_base and len(s["sources"]) != n_models:
                raise ConfigError(f"{s['where']}: {method} takes exactly {_count(n_models, 'source')} per slice")
            others = [e for e in s["sources"] if e["model"] != (s["base"] or base_model)]
            if needs_base and len(others) != n_models:
                raise ConfigError(
                    f"{s['where']}: {method} merges the base model with exactly {_count(n_models, 'other model')}"
                )

    first_model = slices[0]["sources"][0]["model"]
    base = base_model or first_model
    n_base = _model_layers(base)
    for e in (e for s in slices for e in s["sources"]):
        if e["range"] is None:
            e["range"] = (0, _model_layers(e["model"], n_base))

    # every model that is merged (not the base) becomes a recipe source, in order of appearance
    def merged_models(s: dict) -> list[dict]:
        sb = s["base"] or base_model
        if needs_base:
            return [e for e in s["sources"] if e["model"] != sb]
        return list(s["sources"])

    for s in slices:
        if needs_base and not any(e["model"] == (s["base"] or base_model) for e in s["sources"]):
            if len(slices) == 1 and s["where"] == "models":  # mergekit adds the base to `models`
                s["sources"].append({"model": base, "params": {}, "range": (0, n_base), "where": "base_model"})
            else:
                raise ConfigError(f"{s['where']}.sources: the base model must be one of the slice's sources")

    aligned = not stored and _aligned(slices, n_base)
    param_names = _check_params(method, spec, gparams, slices)
    names = checkpoint_names(base.split("+")[0] if not Path(base).exists() else base)
    if any(LAYER_NAME_RE.match(n) is None and tensor_slot(n) not in ("embed", "head") for n in names):
        raise ConfigError(f"{base}: cannot tell the blocks of this checkpoint apart")

    sources: list[str] = []
    for s in slices:
        for e in merged_models(s):
            if e["model"] not in sources and e["model"] != base:
                sources.append(e["model"])
    if not needs_base:  # no base: every model is merged, the recipe base is only the origin
        sources = []
        for s in slices:
            for e in s["sources"]:
                if e["model"] not in sources:
                    sources.append(e["model"])

    notes: list[str] = []
    if spec.mergekit_drop == "distribution":
        notes.append(
            f"{spec.name} drop masks come from evomerge's seeded generator, not mergekit's: equal in distribution"
        )

    resolver = _Resolver(method, spec, gparams, param_names)
    if aligned:
        groups, params = _plain_groups(resolver, slices, names, sources, needs_base, base_model)
        recipe = Recipe(base=base, sources=sources, method=spec.name, params=params, groups=groups)
    else:
        rslices: list[LayerSlice] = []
        for si, s in enumerate(slices):
            merged = merged_models(s)
            rel = _slice_groups(resolver, s, merged, names, first=si == 0, last=si == len(slices) - 1)
            groups, params = rel
            rslices.append(
                LayerSlice(
                    sources=[
                        SliceSource(model=e["model"], start=e["range"][0], stop=e["range"][1]) for e in s["sources"]
                    ],
                    base=s["base"],
                    groups=groups,
                    params=params,
                )
            )
        recipe = Recipe(
            base=base,
            sources=[m for m in sources if m != base],
            method=spec.name,
            groups=[],
            slices=rslices,
        )
    tok = config.get("tokenizer_source")
    if tok is not None:
        if tok == "union":
            raise ConfigError("tokenizer_source: 'union' (vocabulary merging) is not supported")
        tok = base if tok == "base" else _model_ref(tok, "tokenizer_source", config_dir)
    return MergeJob(recipe=recipe, out_dtype=str(out_dtype) if out_dtype else None, tokenizer_source=tok, notes=notes)


def _count(n: int, what: str) -> str:
    return f"one {what}" if n == 1 else f"{n} {what}s"


def _aligned(slices: list[dict], n_base: int) -> bool:
    """Whether the slices keep every block where it is (so per-block groups express them)."""
    pos = 0
    for s in slices:
        rngs = {e["range"] for e in s["sources"]}
        if len(rngs) != 1:
            return False
        (a, b) = next(iter(rngs))
        if a != pos:
            return False
        pos = b
    return pos == n_base


def _check_params(method: str, spec: OperatorSpec, gparams: dict, slices: list[dict]) -> set[str]:
    """Validate parameter names; return every name used anywhere."""
    allowed_shared = set(MERGEKIT_DEFAULTS.get(method, {})) | _IGNORED_SHARED
    if not takes_slices(spec):  # evomerge's own method-wide params (a slice copy's are the slices')
        allowed_shared |= set(spec.params) - set(input_params(spec).values())
    allowed_input = set(spec.mergekit_inputs)
    used: set[str] = set()

    def check(d: dict, where: str, per_model: bool) -> None:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be a mapping")
        for k in d:
            ok = k in allowed_input or k in allowed_shared
            if not ok:
                raise ConfigError(
                    f"{where}.{k}: not a parameter evomerge supports for {method} "
                    f"(supported: {', '.join(sorted(allowed_input | allowed_shared)) or 'none'})"
                )
            used.add(k)

    check(gparams, "parameters", False)
    for s in slices:
        check(s["params"], f"{s['where']}.parameters", False)
        for e in s["sources"]:
            check(e["params"], f"{e['where']}.parameters", True)
    return used


class _Resolver:
    """Per tensor, the translated per-source genes and method parameters."""

    def __init__(self, method: str, spec: OperatorSpec, gparams: dict, used: set[str]) -> None:
        self.method = method
        self.spec = spec
        self.gparams = gparams
        self.used = used

    def per_source(self, e: dict, s: dict, name: str, t: float) -> tuple[float, float | None, dict]:
        """The model's weight, density (``None`` without a density gene) and method-wide params."""
        scopes = (e["params"], s["params"], self.gparams)
        genes: dict[str, float] = {}
        extra: dict[str, float] = {}
        for k, (target, default) in self.spec.mergekit_inputs.items():
            if target not in ("weight", "density") and k not in self.used:
                continue  # evomerge's default is mergekit's
            v = resolve_setting(k, scopes, name, t)
            if v is None:
                if default is REQUIRED:
                    raise ConfigError(f"{e['where']}.parameters.{k}: required by {self.method} (tensor {name})")
                v = default
            (genes if target in ("weight", "density") else extra)[target] = number(v, f"{e['where']}.parameters.{k}")
        dens = genes.get("density") if "density" in self.spec.source_genes else None
        return genes.get("weight", 1.0), dens, extra

    def shared(self, s: dict, name: str, t: float) -> dict[str, Any]:
        scopes = (s["params"], self.gparams)
        out: dict[str, Any] = {}
        spec_params = self.spec.params
        for k, default in MERGEKIT_DEFAULTS.get(self.method, {}).items():
            v = resolve_setting(k, scopes, name, t)
            if default is REQUIRED:  # (SLERP's t) as given; nowhere in the config: evomerge's default
                if v is None and k in self.used:
                    raise ConfigError(f"parameters.{k}: no value for tensor {name}")
                if v is not None:
                    out[k] = v
                continue
            if v is None:
                v = default
            if k not in spec_params:
                if k == "rescale" and bool(v) and self.spec.sparsify is not None:
                    raise ConfigError(f"parameters.rescale: evomerge's {self.spec.name} has no rescale option")
                continue
            if k == "rescale" and self.spec.mergekit_rescale is not None:
                v = self.spec.mergekit_rescale[0 if bool(v) else 1]
            elif k == "rescale" or isinstance(default, bool):
                v = bool(v)
            else:
                v = number(v, f"parameters.{k}")
            out[k] = v
        for k in self.used:
            if (
                k in self.spec.mergekit_inputs
                or k in _IGNORED_SHARED
                or k in out
                or k in MERGEKIT_DEFAULTS.get(self.method, {})
            ):
                continue
            v = resolve_setting(k, scopes, name, t)
            if v is None:
                raise ConfigError(f"parameters.{k}: no value for tensor {name}")
            out[k] = v
        return out


def _signature(resolver: _Resolver, s: dict, merged: list[dict], name: str, t: float) -> tuple:
    ws, ds, extras = [], [], []
    for e in merged:
        w, d, ex = resolver.per_source(e, s, name, t)
        ws.append(w)
        ds.append(d)
        extras.append(ex)
    shared = resolver.shared(s, name, t)
    for k in input_params(resolver.spec).values():
        vals = {ex[k] for ex in extras if k in ex}
        if len(vals) > 1:
            raise ConfigError(f"parameters.{k}: evomerge takes one {k} for all models (got {sorted(vals)})")
        if vals:
            shared[k] = vals.pop()
    dens = None if all(d is None for d in ds) else tuple(ds)
    return (tuple(ws), dens, tuple(sorted(shared.items())))


def _build_groups(
    items: list[tuple[str, str | int, tuple]], filters: list[str], prefix: str = ""
) -> tuple[list[LayerGroup], dict]:
    """Group tensors ``(name, slot, signature)`` into LayerGroups (filters where a slot is not uniform)."""
    # method-wide params constant over every tensor go to the recipe; the others to the groups
    all_shared = [dict(sig[2]) for _, _, sig in items]
    keys = set().union(*all_shared) if all_shared else set()
    const = {k: all_shared[0][k] for k in keys if all(d.get(k, object()) == all_shared[0].get(k) for d in all_shared)}

    by_slot: dict[Any, list[tuple[str, tuple]]] = {}
    for name, slot, sig in items:
        by_slot.setdefault(slot, []).append((name, sig))

    def layout(entries: list[tuple[str, tuple]], generic: bool) -> tuple:
        classes: dict[tuple, list[str]] = {}
        for name, sig in entries:
            classes.setdefault(sig, []).append(name)
        default = max(classes, key=lambda k: len(classes[k]))
        slot_names = [n for n, _ in entries]
        out = []
        for sig, members in classes.items():
            if sig == default:
                continue
            mset, covered = set(members), set()
            for f in filters:
                sel = {n for n in slot_names if f in n}
                if sel and sel <= mset and not sel <= covered:
                    out.append((f, sig))
                    covered |= sel
            for n in members:
                if n not in covered:
                    if generic:
                        return None  # needs an exact-name filter: not the same across blocks
                    out.append((n, sig))
        out.append((None, default))
        return tuple(out)

    def to_group(gname, kind, start, stop, filt, sig) -> LayerGroup:
        ws, ds, sh = sig
        extra = {k: v for k, v in dict(sh).items() if k not in const}
        return LayerGroup(
            name=gname, kind=kind, start=start, stop=stop, weights=list(ws),
            densities=list(ds) if ds is not None else None, filter=filt, params=extra or None,
        )  # fmt: skip

    groups: list[LayerGroup] = []

    def emit(slot_key, kind, start, stop, lay):
        for filt, sig in lay:
            base = f"{prefix}{kind}" if kind != "blocks" else f"{prefix}blocks_{start}_{stop}"
            gname = base if filt is None else f"{base}[{filt}]"
            groups.append(to_group(gname, kind, start, stop, filt, sig))

    if "embed" in by_slot:
        emit("embed", "embed", None, None, layout(by_slot["embed"], False))
    blocks = sorted(k for k in by_slot if isinstance(k, int))
    run_start, run_lay = None, None
    for b in blocks:
        # compare layouts on names with the block index removed, so equal blocks merge into one run
        entries = [(LAYER_NAME_RE.sub(r"\g<pre>#.\g<suf>", n), sig) for n, sig in by_slot[b]]
        lay = layout(entries, True)
        if lay is None:
            lay_exact = layout(by_slot[b], False)
            if run_start is not None:
                emit(None, "blocks", run_start, b, run_lay)
                run_start = None
            emit(None, "blocks", b, b + 1, lay_exact)
            continue
        if run_start is not None and lay == run_lay and b == prev + 1:  # noqa: F821
            prev = b
            continue
        if run_start is not None:
            emit(None, "blocks", run_start, prev + 1, run_lay)  # noqa: F821
        run_start, run_lay, prev = b, lay, b
    if run_start is not None:
        emit(None, "blocks", run_start, prev + 1, run_lay)
    if "head" in by_slot:
        emit("head", "head", None, None, layout(by_slot["head"], False))
    return groups, const


def _all_filters(gparams: dict, slices: list[dict]) -> list[str]:
    out: list[str] = []
    for d in [gparams] + [s["params"] for s in slices] + [e["params"] for s in slices for e in s["sources"]]:
        for v in d.values():
            filters_in(v, out)
    return out


def _plain_groups(resolver, slices, names, sources, needs_base, base_model):
    """Aligned slices (or `models:`): per-block groups over the recipe's sources."""
    items = []
    block_slice: dict[int, tuple[dict, int, int]] = {}
    for s in slices:
        a, b = s["sources"][0]["range"]
        for i in range(a, b):
            block_slice[i] = (s, i - a, b - a)

    def merged_for(s):
        if needs_base:
            sb = s["base"] or base_model
            ms = [e for e in s["sources"] if e["model"] != sb]
        else:
            ms = list(s["sources"])
        by_model = {e["model"]: e for e in ms}
        if set(by_model) != set(sources) or len(ms) != len(sources):
            raise ConfigError(f"{s['where']}.sources: every slice must merge the same models in this form")
        return [by_model[m] for m in sources]

    for name in names:
        slot = tensor_slot(name)
        if slot == "embed":
            s, t = slices[0], 0.0
        elif slot == "head":
            s, t = slices[-1], 0.0
        else:
            s, j, n = block_slice[slot]
            t = block_t(j, n)
        items.append((name, slot, _signature(resolver, s, merged_for(s), name, t)))
    return _build_groups(items, _all_filters(resolver.gparams, slices))


def _slice_groups(resolver, s, merged, names, *, first: bool, last: bool):
    """Groups of one output slice of a layer-stacking recipe (blocks counted from the slice start)."""
    n = s["sources"][0]["range"][1] - s["sources"][0]["range"][0]
    layer_sufs, seen = [], set()
    for nm in names:
        m = LAYER_NAME_RE.match(nm)
        if m and m.group("suf") not in seen:
            seen.add(m.group("suf"))
            layer_sufs.append((m.group("pre"), m.group("suf")))
    items = []
    for nm in names:
        slot = tensor_slot(nm)
        if (slot == "embed" and first) or (slot == "head" and last):
            items.append((nm, slot, _signature(resolver, s, merged, nm, 0.0)))
    for j in range(n):
        for pre, suf in layer_sufs:
            nm = f"{pre}{j}.{suf}"
            items.append((nm, j, _signature(resolver, s, merged, nm, block_t(j, n))))
    return _build_groups(items, _all_filters(resolver.gparams, [s]))


def dtype_of(name: str | None) -> torch.dtype | None:
    """The torch dtype of a mergekit dtype name (``None`` stays ``None``)."""
    if name is None:
        return None
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}") from None
