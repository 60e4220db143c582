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
from evomerge.merge.mergekit_settings import MERGEKIT_DEFAULTS, block_t, evaluate_setting
from evomerge.merge.operators import get_operator, resolve_params
from evomerge.recipe import Recipe, tensor_slot

__all__ = ["dump_mergekit_yaml", "recipe_to_mergekit"]


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

    Per-group coefficients become per-layer gradient lists (with exact-name ``filter`` conditions for
    the embeddings and head when they differ), group filters become ``filter`` conditions, and
    ``normalize`` / ``rescale`` / ``lambda`` are always written out, since mergekit's defaults differ
    from evomerge's. ``None`` when: the method has no mergekit counterpart; DARE uses evomerge's
    default ``rescale: inverse`` (1/density) with some density below 1 (mergekit 0.1.5 only has the L1
    rescale); a source is the base model itself in a task-vector method; the recipe has slices; or the
    base checkpoint cannot be read for its tensor names. DARE's masks are drawn by another RNG in
    mergekit, so such a config matches in distribution, not bit for bit (a line goes to ``notes``).
    ``tensor_names`` avoids reading the base checkpoint.
    """
    if recipe.slices is not None:
        return None
    try:
        spec = get_operator(recipe.method)
    except KeyError:
        return None
    mk = spec.mergekit_method
    if mk not in MERGEKIT_DEFAULTS or mk in ("slerp", "passthrough"):
        return None
    if tensor_names is None:
        try:
            tensor_names = checkpoint_names(model_path(recipe.base))
        except Exception:
            return None
    task_vector = mk != "linear"
    if task_vector and any(s == recipe.base for s in recipe.sources):
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
    shared: dict[str, Any] = {}
    any_drop = any(g.densities is not None and any(d < 1 for d in g.densities) for g in recipe.groups)
    try:
        for key in MERGEKIT_DEFAULTS[mk]:
            vals = {}
            for n, p in params_of.items():
                if key == "rescale":
                    r = p.get("rescale", False)
                    if r in ("inverse", "1/density", "inv"):
                        if spec.sparsify == "random" and any_drop:
                            return None
                        r = False
                    vals[n] = bool(r is True or r == "l1")
                elif key in p:
                    vals[n] = p[key]
                else:
                    vals[n] = MERGEKIT_DEFAULTS[mk][key]
            shared[key] = _setting_for(vals, slots, n_layers, filters)
        extra = set(next(iter(params_of.values()))) - set(MERGEKIT_DEFAULTS[mk])
        if extra:
            return None
        models = []
        for k, src in enumerate(recipe.sources):
            mp: dict[str, Any] = {
                "weight": _setting_for({n: g.weights[k] for n, g in per_tensor.items()}, slots, n_layers, filters)
            }
            if "density" in spec.source_genes:
                mp["density"] = _setting_for(
                    {n: (g.densities[k] if g.densities is not None else 1.0) for n, g in per_tensor.items()},
                    slots, n_layers, filters,
                )  # fmt: skip
            models.append({"model": src, "parameters": mp})
    except ValueError:
        return None
    cfg: dict[str, Any] = {"merge_method": mk}
    if task_vector:
        cfg["base_model"] = recipe.base
    cfg["models"] = models
    cfg["parameters"] = shared
    cfg["dtype"] = "float32"
    if spec.sparsify == "random" and any_drop and notes is not None:
        notes.append("DARE masks: mergekit draws them with its own RNG, so this config matches in distribution only")
    return cfg


def dump_mergekit_yaml(cfg: dict) -> str:
    """YAML text of a mergekit config (number lists in flow style, as mergekit writes them)."""

    class _Dumper(yaml.SafeDumper):
        pass

    def rep_list(dumper, data):
        flow = all(isinstance(e, (int, float)) for e in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    _Dumper.add_representer(list, rep_list)
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False)
