"""mergekit 0.1.5's config semantics, shared by translation in and out: defaults, parameter values.

mergekit semantics reproduced here (mergekit 0.1.5, ``mergekit/config.py`` and ``plan.py``):

- a list value is a gradient: for block ``i`` of an output slice of ``n`` blocks, ``t = i / (n - 1)``
  (``t = 1`` when ``n == 1``) and the list is interpolated piecewise-linearly at ``t * (len - 1)``;
  the tensors outside the blocks (embeddings, final norm, head) use ``t = 0`` with the first slice
  (embeddings) or the last slice (norm, head);
- a list of ``{filter, value}`` conditions takes the first whose filter is a substring of the tensor
  name (no filter, or ``*``, matches all);
- per-model parameters override the slice's, which override the top-level ones; method-wide
  parameters (``normalize``, ``lambda``, ``t``...) are read from the slice and the top level only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from evomerge.merge.operators import OPERATORS, OperatorSpec

__all__ = [
    "MERGEKIT_DEFAULTS",
    "ConfigError",
    "block_t",
    "evaluate_setting",
    "filters_in",
    "input_params",
    "number",
    "resolve_setting",
    "takes_slices",
]

# mergekit 0.1.5's defaults of the method-wide parameters, as each operator's spec declares them (they
# differ per method, so a translated recipe states them explicitly instead of relying on evomerge's).
MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    s.mergekit_method: s.mergekit_defaults
    for s in OPERATORS.values()
    if s.mergekit_method is not None and s.mergekit_defaults is not None
}


def takes_slices(spec: OperatorSpec) -> bool:
    """Whether the operator is mergekit's ``passthrough``: it copies one model's tensor as stored, so in
    mergekit it takes layer slices of one model each (and no base)."""
    return "source_tensor" in spec.context


def input_params(spec: OperatorSpec) -> dict[str, str]:
    """mergekit's per-model parameters that are method-wide params in evomerge (one value for all models):
    mergekit name -> evomerge param (breadcrumbs' ``gamma``, DELLA's ``epsilon``)."""
    return {k: t for k, (t, _) in spec.mergekit_inputs.items() if t not in ("weight", "density")}


class ConfigError(ValueError):
    """A merge config evomerge cannot run: one line naming the field. The CLI exits with code 2."""

    def __init__(self, message: str) -> None:
        # Keys and values quoted from the config may hold line breaks; the message stays one line.
        super().__init__(" ".join(str(message).split()))


def number(value: Any, where: str) -> float:
    """A parameter's value as a finite float; anything else is a ConfigError naming ``where``."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: expected a number, got {_shown(value)}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}: expected a finite number, got {_shown(value)}")
    return v


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def block_t(i: int, n: int) -> float:
    """mergekit's gradient position of block ``i`` of an output slice of ``n`` blocks."""
    return i / (n - 1) if n > 1 else 1.0


def evaluate_setting(setting: Any, tensor_name: str, t: float = 0.0) -> Any:
    """mergekit's ``evaluate_setting``: resolve filters and gradients of one parameter value."""
    if isinstance(setting, dict):
        setting = [setting]
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return _scalar(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(not isinstance(e, (dict, list)) for e in setting):
            vals = [_scalar(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                return vals[int(t * (len(vals) - 1))]
            scaled = t * (len(vals) - 1)
            i0 = int(scaled)
            i1 = min(len(vals) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * vals[i0] + frac * vals[i1]
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise ConfigError(f"a conditional parameter must be a mapping with 'value' (got {cond!r})")
            f = cond.get("filter")
            if f is None or f == "*" or (tensor_name and str(f) in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    raise ConfigError(f"unexpected parameter value {setting!r}")


def _scalar(v: Any) -> Any:
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        try:
            return float(v)
        except ValueError:
            return v
    return v


def resolve_setting(name: str, scopes: Iterable[dict | None], tensor_name: str, t: float) -> Any:
    for sc in scopes:
        if sc and name in sc:
            try:
                v = evaluate_setting(sc[name], tensor_name, t)
            except ConfigError as e:  # name the parameter: the value alone does not say where it is
                raise ConfigError(f"parameters.{name}: {e}") from None
            if v is not None:
                return v
    return None


def filters_in(setting: Any, out: list[str]) -> None:
    if isinstance(setting, dict):
        f = setting.get("filter")
        if f is not None and f != "*" and str(f) not in out:
            out.append(str(f))
        filters_in(setting.get("value"), out)
    elif isinstance(setting, list):
        for e in setting:
            filters_in(e, out)
