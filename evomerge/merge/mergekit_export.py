"""mergekit configs out: a :class:`~evomerge.recipe.Recipe` written as a mergekit 0.1.5 config.

:func:`recipe_to_mergekit` gives the config (a dict for YAML) when mergekit can express the recipe,
else ``None``; :func:`dump_mergekit_yaml` writes it as mergekit writes its own. Each emitted setting is
checked against mergekit's evaluation (:func:`~evomerge.merge.mergekit_settings.evaluate_setting`).
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from evomerge.merge.checkpoint import checkpoint_names, model_path
from evomerge.merge.mergekit_settings import MERGEKIT_DEFAULTS, block_t, evaluate_setting, takes_slices
from evomerge.merge.operators import REQUIRED, get_operator, resolve_params
from evomerge.recipe import LayerGroup, Recipe, tensor_slot

__all__ = ["dump_mergekit_yaml", "recipe_to_mergekit"]

_NONE = object()  # no value (a fixed value may be None)


def _gradient(vals: list[float]) -> Any:
    """A per-block value list as a mergekit setting: scalar, 2-point gradient, or the full list."""
    if all(_close(v, vals[0]) for v in vals):
        return vals[0]
    n = len(vals)
    if n > 2:
        lin = [vals[0] + (vals[-1] - vals[0]) * i / (n - 1) for i in range(n)]
        if all(_close(a, b) for a, b in zip(lin, vals, strict=True)):
            return [vals[0], vals[-1]]
    return list(vals)


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_close, a, b))
    return _close(a, b)


def _close(a: Any, b: Any) -> bool:
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _setting_for(values: dict[str, Any], slots: dict[str, Any], n_layers: int, filters: list[str]) -> Any:
    """A mergekit setting that evaluates to ``values[name]`` for every tensor name, or raise."""
    blocks = {n: s for n, s in slots.items() if isinstance(s, int)}
    conds: list[dict] = []
    for f in filters:
        per_block: list[Any] = []
        ok = True
        for i in range(n_layers):
            vs = {values[n] for n, s in blocks.items() if s == i and f in n}
            if len(vs) > 1:
                ok = False
                break
            per_block.append(vs.pop() if vs else None)
        if ok and any(v is not None for v in per_block):
            conds.append({"filter": f, "per_block": per_block})
    default = []
    for i in range(n_layers):
        names = [n for n, s in blocks.items() if s == i and not any(f in n for f in filters)]
        vs = {values[n] for n in names}
        if len(vs) > 1:
            raise ValueError("not expressible")
        default.append(vs.pop() if vs else None)
    fill = next((v for v in default if v is not None), None)
    default = [fill if v is None else v for v in default]
    for c in conds:
        c["value"] = _gradient([d if v is None else v for v, d in zip(c.pop("per_block"), default, strict=True)])
    main = _gradient(default) if default else None
    conds = [c for c in conds if not _same_setting(c["value"], main)]
    setting: Any = [*conds, {"value": main}] if conds else main
    # outside the blocks (t = 0): exact-name conditions in front where the rest gives another value
    front = []
    for n, s in slots.items():
        if isinstance(s, int):
            continue
        if main is None or not _close(evaluate_setting(setting, n, 0.0), values[n]):
            front.append({"filter": n, "value": values[n]})
    if front:
        setting = front + (
            setting if isinstance(setting, list) and setting and isinstance(setting[0], dict) else [{"value": setting}]
        )
    for n, s in slots.items():  # verify against mergekit's evaluation
        t = block_t(s, n_layers) if isinstance(s, int) else 0.0
        if not _close(evaluate_setting(setting, n, t), values[n]):
            raise ValueError(f"not expressible for {n}")
    return setting


def recipe_to_mergekit(
    recipe: Recipe, *, tensor_names: list[str] | None = None, notes: list[str] | None = None
) -> dict | None:
    """The recipe as a mergekit 0.1.5 config (a dict to dump as YAML), or ``None`` if inexpressible.

    What the operator's spec declares decides the translation (``mergekit_*`` fields of
    :class:`~evomerge.merge.operators.OperatorSpec`). Per-group coefficients become per-layer gradient
    lists (with exact-name ``filter`` conditions for the embeddings and head when they differ), group
    filters become ``filter`` conditions, and mergekit's method-wide parameters are always written out,
    since mergekit's defaults differ from evomerge's; evomerge params that mergekit takes per model
    (breadcrumbs' ``gamma``, DELLA's ``epsilon``) go to every model. A stored-tensor copy (passthrough)
    becomes layer slices, one run of blocks per model. ``None`` when: the method has no mergekit
    counterpart; a param has none (a ``rescale`` with no mergekit counterpart, evomerge's default 1/p
    for DARE and DELLA, counts only when some density is below 1) or differs from the value mergekit
    always uses; the recipe drops entries where the spec says a drop does not export (DELLA); a source
    is the base model itself in a task-vector method; the recipe has slices; or the base checkpoint
    cannot be read for its tensor names. DARE's masks are drawn by another RNG in mergekit, so such a
    config matches in distribution, not bit for bit (a line goes to ``notes``). ``tensor_names`` avoids
    reading the base checkpoint.
    """
    if recipe.slices is not None:
        return None
    try:
        spec = get_operator(recipe.method)
    except KeyError:
        return None
    mk = spec.mergekit_method
    if mk not in MERGEKIT_DEFAULTS:
        return None
    if tensor_names is None:
        try:
            tensor_names = checkpoint_names(model_path(recipe.base))
        except Exception:
            return None
    slots = {n: tensor_slot(n) for n in tensor_names}
    blocks = [s for s in slots.values() if isinstance(s, int)]
    n_layers = max(blocks) + 1 if blocks else 0
    try:
        per_tensor = {n: recipe.group_for(n) for n in tensor_names}
    except KeyError:
        return None
    params_of = {n: resolve_params(spec, recipe.params_for(g)) for n, g in per_tensor.items()}
    filters = []
    for g in recipe.groups:
        if g.filter is not None and g.filter not in filters:
            filters.append(g.filter)
    if takes_slices(spec):
        try:
            return _layer_slices(recipe, mk, params_of, slots, n_layers, filters)
        except ValueError:
            return None
    # which recipe models are mergekit's base and merged models
    base, merged = recipe.base, list(range(len(recipe.sources)))
    n_models = spec.mergekit_models
    if n_models is not None and len(merged) != n_models:
        if not (len(merged) == n_models + 1 and spec.max_sources == n_models + 1):
            return None
        base, merged = recipe.sources[0], merged[1:]  # (SLERP of two sources: the base is only the origin)
    if spec.needs_base and any(recipe.sources[k] == base for k in merged):
        return None
    any_drop = "density" in spec.source_genes and any(
        g.densities is not None and any(d < 1 for d in g.densities) for g in recipe.groups
    )
    if any_drop and spec.mergekit_drop == "none":
        return None
    to_inputs = {t for t, _ in spec.mergekit_inputs.values()}
    for key in next(iter(params_of.values()), {}):
        fixed = spec.mergekit_fixed.get(key, _NONE)
        if key in MERGEKIT_DEFAULTS[mk] or key in to_inputs:
            continue
        if fixed is _NONE or any(not _close(p[key], fixed) for p in params_of.values()):
            return None  # an evomerge param mergekit does not have, or not at mergekit's value
    shared: dict[str, Any] = {}
    try:
        for key, default in MERGEKIT_DEFAULTS[mk].items():
            vals = {}
            for n, p in params_of.items():
                if key == "rescale" and spec.mergekit_rescale is not None:
                    vals[n] = _mergekit_rescale(p.get(key), spec.mergekit_rescale, any_drop)
                elif key in p:
                    vals[n] = p[key]
                elif default is REQUIRED:
                    return None
                else:
                    vals[n] = default
            shared[key] = _setting_for(vals, slots, n_layers, filters)
        models = []
        for k in merged:
            mp: dict[str, Any] = {}
            for mk_name, (target, _) in spec.mergekit_inputs.items():
                vals = {n: _input_value(target, g, k, params_of[n]) for n, g in per_tensor.items()}
                mp[mk_name] = _setting_for(vals, slots, n_layers, filters)
            models.append({"model": recipe.sources[k], "parameters": mp} if mp else {"model": recipe.sources[k]})
    except ValueError:
        return None
    cfg: dict[str, Any] = {"merge_method": mk}
    if spec.needs_base:
        cfg["base_model"] = base
    cfg["models"] = models
    cfg["parameters"] = shared
    cfg["dtype"] = "float32"
    if spec.mergekit_drop == "distribution" and any_drop and notes is not None:
        notes.append(
            f"{spec.name} masks: mergekit draws them with its own RNG, so this config matches in distribution only"
        )
    return cfg


def _mergekit_rescale(value: Any, table: tuple[Any, Any], any_drop: bool) -> bool:
    """evomerge's ``rescale`` as mergekit's bool (``table``: evomerge's values for true and false)."""
    if value is True or value == table[0]:
        return True
    if value is False or value is None or value == table[1]:
        return False
    if any_drop:  # (the 1/p rule) mergekit has no such rescale
        raise ValueError(f"rescale {value!r} is not expressible")
    return False  # nothing is dropped: no rescale either way


def _input_value(target: str, g: LayerGroup, k: int, params: dict[str, Any]) -> Any:
    """The value of mergekit per-model input (evomerge's ``target``) of model ``k`` for one tensor."""
    if target == "weight":
        return g.weights[k]
    if target == "density":
        return g.densities[k] if g.densities is not None else 1.0
    return params[target]


def _layer_slices(
    recipe: Recipe, mk: str, params_of: dict[str, dict], slots: dict[str, Any], n_layers: int, filters: list[str]
) -> dict:
    """A stored-tensor copy (passthrough) as mergekit layer slices, or raise ``ValueError``.

    Each run of blocks taken from one model is a slice of that model (its blocks stay in place); the
    embeddings must come from the first slice's model and the head from the last's, as in mergekit, and
    a block must come from one model (a filter group taking a part of it from another does not export).
    The group's ``scale`` param becomes the slice source's ``scale``.
    """

    def model_of(name: str) -> str:
        src = int(params_of[name]["source"])
        if not -1 <= src < len(recipe.sources):
            raise ValueError(f"source {src} out of range")
        return recipe.base if src < 0 else recipe.sources[src]

    runs: list[list] = []  # [model, start, stop]
    for i in range(n_layers):
        ms = {model_of(n) for n, s in slots.items() if s == i}
        if len(ms) != 1:
            raise ValueError(f"block {i} takes tensors from {len(ms)} models")
        m = ms.pop()
        if runs and runs[-1][0] == m:
            runs[-1][2] = i + 1
        else:
            runs.append([m, i, i + 1])
    if not runs:
        raise ValueError("no blocks")
    for n, s in slots.items():
        if (s == "embed" and model_of(n) != runs[0][0]) or (s == "head" and model_of(n) != runs[-1][0]):
            raise ValueError(f"{n} comes from another model than its slice")
    slices = []
    for si, (m, a, b) in enumerate(runs):
        sl_slots: dict[str, Any] = {n: s - a for n, s in slots.items() if isinstance(s, int) and a <= s < b}
        outer = {"embed"} if si == 0 else set()
        outer |= {"head"} if si == len(runs) - 1 else set()
        sl_slots.update({n: s for n, s in slots.items() if s in outer})
        scale = _setting_for({n: float(params_of[n]["scale"]) for n in sl_slots}, sl_slots, b - a, filters)
        src: dict[str, Any] = {"model": m, "layer_range": [a, b]}
        if not _same_setting(scale, 1.0):
            src["parameters"] = {"scale": scale}
        slices.append({"sources": [src]})
    return {"merge_method": mk, "slices": slices, "dtype": "float32"}


def dump_mergekit_yaml(cfg: dict) -> str:
    """YAML text of a mergekit config (number lists in flow style, as mergekit writes them)."""

    class _Dumper(yaml.SafeDumper):
        pass

    def rep_list(dumper, data):
        flow = all(isinstance(e, (int, float)) for e in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    _Dumper.add_representer(list, rep_list)
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False)
