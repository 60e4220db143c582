"""Merge operators: pure per-tensor functions and a registry of them.

Notation (DESIGN section 4): ``theta0`` is the base tensor, ``tau_t = theta_t - theta0`` the task vector
of source ``t``, ``w_t`` its weight and ``d_t`` its density. Every operator has the signature::

    fn(base, deltas, weights, densities=None, *, generator=None, thresholds=None, noise=None,
       workspace=None, **params)

- ``base``: the base tensor (any float dtype, any shape).
- ``deltas``: the K task vectors, stacked ``K x base.shape`` (or a sequence of K tensors).
- ``weights``: ``Tensor[K]`` (or a sequence of floats).
- ``densities``: ``Tensor[K]`` or ``None`` (``None`` means 1 for every source).
- ``generator``: seeds the random operators (DARE) when no ``noise`` is given.
- ``thresholds`` / ``noise``: optional precomputed inputs from the :class:`~evomerge.merge.Materializer`
  (the magnitude threshold of each source at its density, or uniform draws in [0, 1) shaped like
  ``deltas``); an operator computes them itself when they are absent, so a pure call and a
  materializer call give the same result.
- ``params``: the method-wide parameters (``lambda``, ``normalize``, ``rescale``...), defaults in the
  operator's :class:`OperatorSpec`.
- ``workspace``: an optional :class:`Workspace` of scratch buffers (the materializer's hot loop); the
  result may then live in the workspace.

The result has the base's dtype and shape; the arithmetic is done in float32 (float64 stays float64).

Conventions follow mergekit 0.1.5 (``mergekit/merge_methods/generalized_task_arithmetic.py`` and
``mergekit/sparsify.py``) unless an operator's docstring says otherwise:

- weights multiply the (sparsified) task vectors *before* the sign election, so a negative weight
  flips a task vector's vote;
- TIES elects the sign of the sum of the weighted, trimmed task vectors (mergekit's ``"sum"``
  consensus; a sum of exactly 0 elects +), and a zero entry (trimmed or untouched) never "agrees";
- ``normalize`` divides by the sum of the weights of the entries that were merged (per entry for
  TIES, per tensor otherwise); a zero divisor becomes 1, for task arithmetic a divisor with
  ``|sum| < 1e-8`` becomes 1;
- ``lambda`` scales the merged task vector after normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "OPERATORS",
    "OperatorSpec",
    "get_operator",
    "linear",
    "task_arithmetic",
    "ties",
    "dare",
    "dare_ties",
    "magnitude_thresholds",
    "trim_count",
    "resolve_params",
    "Workspace",
]

Sparsify = Literal["magnitude", "random"] | None


# --------------------------------------------------------------------------------------------------
# helpers


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _stack(deltas: Sequence[Tensor] | Tensor, base: Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(deltas, Tensor):
        d = deltas
    else:
        d = torch.stack([x.to(base.device) for x in deltas]) if len(deltas) else base.new_empty((0, *base.shape))
    if d.shape[1:] != base.shape:
        raise ValueError(f"task vectors of shape {tuple(d.shape[1:])} for a base of shape {tuple(base.shape)}")
    return d.to(dtype)


def _vec(x: Sequence[float] | Tensor | None, k: int, dtype: torch.dtype, device, default: float) -> Tensor:
    if x is None:
        return torch.full((k,), default, dtype=dtype, device=device)
    t = torch.as_tensor(x, dtype=dtype, device=device).reshape(-1)
    if t.numel() != k:
        raise ValueError(f"expected {k} coefficients, got {t.numel()}")
    return t


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Shape a ``K`` vector to broadcast against a ``K x ...`` tensor."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def trim_count(density: float, numel: int) -> int:
    """How many entries a magnitude trim keeps: mergekit's ``max(1, int(density * numel))``.

    Density >= 1 keeps every entry, density <= 0 keeps none.
    """
    if numel == 0 or density <= 0:
        return 0
    if density >= 1:
        return numel
    return max(1, int(density * numel))


def magnitude_thresholds(deltas: Tensor, densities: Tensor) -> Tensor:
    """Per source, the smallest |tau| that survives a top-``density`` magnitude trim.

    ``-inf`` keeps everything (density >= 1), ``+inf`` keeps nothing (density <= 0). Entries with
    ``|tau| >= threshold`` are kept. This is the slow path (one sort per source); the materializer
    looks the threshold up in a precomputed sorted table instead.
    """
    k = deltas.shape[0]
    out = torch.empty(k, dtype=torch.float32)
    for i in range(k):
        flat = deltas[i].reshape(-1)
        n = trim_count(float(densities[i]), flat.numel())
        if n >= flat.numel():
            out[i] = -math.inf
        elif n == 0:
            out[i] = math.inf
        else:
            # kth largest |tau| == (numel - n + 1)-th smallest
            out[i] = flat.abs().float().kthvalue(flat.numel() - n + 1).values
    return out


class Workspace:
    """Reusable scratch buffers for the operators' temporaries.

    On CPU, a fresh multi-hundred-KB temporary per op goes through ``mmap`` and page faults, which cost
    3-5x the arithmetic (measured on the materializer's chunks with torch 2.13); the materializer passes
    one workspace so the hot loop allocates nothing. Without one, operators allocate as usual.
    A result computed with a workspace may live in it: copy it out before the next call.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._bufs[key] = buf
        return buf[:n].view(shape)


def _buf(ws: Workspace | None, key: str, shape, like: Tensor) -> Tensor:
    shape = tuple(shape)
    return ws.get(key, shape, like) if ws is not None else torch.empty(shape, dtype=like.dtype, device=like.device)


def _magnitude_mask(d: Tensor, thresholds: Tensor, out: Tensor) -> Tensor:
    """Float 0/1 mask (written to ``out``) of the entries with |tau| >= threshold, per source.

    mergekit keeps exactly ``k`` entries by an argsort; a threshold keeps every entry tied with the
    k-th largest magnitude as well. The two differ only on exact ties of |tau| at the threshold, which
    do not occur in real checkpoints except for exact zeros, and a kept zero contributes nothing.

    Masks are built with float arithmetic (``sign``/``clamp``) rather than comparisons: on CPU,
    comparisons to bool and ``where``/``masked_fill`` are several times slower than float ops
    (measured in torch 2.13). ``|d| - thr >= 0`` iff ``|d| >= thr`` in IEEE arithmetic.
    """
    thr = _bcast(thresholds.to(d.device, d.dtype), d)
    torch.abs(d, out=out)
    out.sub_(thr)
    torch.sign(out, out=out)
    return out.add_(1).clamp_(max=1)


def _dare_keep(d: Tensor, dens: Tensor, generator, noise: Tensor | None, out: Tensor) -> Tensor:
    """Float 0/1 Bernoulli keep-mask (written to ``out``), P(keep) = density: ``u < density``.

    ``u ~ U[0, 1)``: one uniform draw per entry (rather than ``torch.bernoulli`` per density) makes
    the masks nested across densities under a fixed seed, so a small change of density changes few
    entries. A density >= 1 keeps every entry (u < 1 always), a density <= 0 none.
    """
    if noise is None:
        noise = torch.rand(d.shape, generator=generator, device=d.device, dtype=torch.float32)
    noise = noise.to(d.device, d.dtype)
    torch.sub(_bcast(dens.to(d.device, d.dtype), d), noise, out=out)
    torch.sign(out, out=out)
    return out.clamp_(min=0)


def _dare_sparsify(
    d: Tensor, dens: Tensor, generator, noise, rescale: Any, ws: Workspace | None
) -> tuple[Tensor, Tensor]:
    """DARE drop: returns (masked task vectors, per-source rescale factor still to apply)."""
    k = d.shape[0]
    mode = _rescale_mode(rescale)
    if not bool((dens < 1).any()):  # nothing to drop: mergekit returns the task vectors untouched
        return d, torch.ones(k, dtype=d.dtype, device=d.device)
    masked = _dare_keep(d, dens, generator, noise, _buf(ws, "A", d.shape, d)).mul_(d)
    full = dens >= 1
    if mode == "none":
        scale = torch.ones(k, dtype=d.dtype, device=d.device)
    elif mode == "inverse":
        scale = torch.where(dens > 0, 1.0 / dens.clamp(1e-12, 1.0), torch.zeros_like(dens)).to(d.dtype)
    else:  # l1: match each source's L1 norm before the drop (mergekit's ``rescale: true``)
        before = d.reshape(k, -1).abs().sum(1)
        after = masked.reshape(k, -1).abs().sum(1)
        ok = (before >= 1e-7) & (after >= 1e-7)
        scale = torch.where(ok, before / after.clamp_min(1e-30), torch.ones_like(before))
    scale = torch.where(full.to(scale.device), torch.ones_like(scale), scale)
    return masked, scale


def _rescale_mode(rescale: Any) -> str:
    if rescale is True or rescale == "l1":
        return "l1"
    if rescale is False or rescale is None or rescale == "none":
        return "none"
    if rescale in ("inverse", "1/density", "inv"):
        return "inverse"
    raise ValueError(f"rescale must be 'inverse', 'l1' (or true) or 'none' (or false), not {rescale!r}")


def _ties_combine(base: Tensor, wd: Tensor, w: Tensor, normalize: bool, lam: float, ws: Workspace | None) -> Tensor:
    """TIES sign election and disjoint merge of weighted task vectors ``wd = w_t * tau_t``.

    Float arithmetic throughout (see :func:`_magnitude_mask`); the values are those of mergekit's
    ``get_mask(method="sum")`` path: the elected sign is + where the sum is >= 0, an entry agrees when
    its sign equals the elected one (zeros never do); mixed = sum(wd * agree), divisor =
    sum(w * agree), a zero divisor becomes 1.
    """
    n_shape = wd.shape[1:]
    elected = _buf(ws, "s", n_shape, wd)
    torch.sum(wd, 0, out=elected)
    torch.sign(elected, out=elected)
    elected.add_(0.5)
    torch.sign(elected, out=elected)  # +1 where the sum is >= 0, else -1
    agree = _buf(ws, "B", wd.shape, wd)
    torch.mul(wd, elected, out=agree)
    torch.sign(agree, out=agree)
    agree.clamp_(min=0)  # 1 where the sign is the elected one, 0 otherwise (zeros too)
    divisor = None
    if normalize:
        tmp = _buf(ws, "C", wd.shape, wd)
        torch.mul(agree, _bcast(w.to(wd.dtype), wd), out=tmp)
        divisor = _buf(ws, "t", n_shape, wd)
        torch.sum(tmp, 0, out=divisor)
    agree.mul_(wd)
    mixed = elected  # reuse: the election is done
    torch.sum(agree, 0, out=mixed)
    if divisor is not None:
        z = _buf(ws, "u", n_shape, wd)
        torch.abs(divisor, out=z)
        torch.sign(z, out=z)
        z.neg_().add_(1)  # 1 where the divisor is 0, else 0 (exact)
        divisor.add_(z)
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)


def _ta_combine(base: Tensor, d: Tensor, w: Tensor, normalize: bool, lam: float, ws: Workspace | None = None) -> Tensor:
    mixed = _buf(ws, "s", base.shape, base)
    if d.shape[0]:
        torch.mv(d.reshape(d.shape[0], -1).t(), w.to(d.dtype), out=mixed.view(-1))
    else:
        mixed.zero_()
    if normalize:
        s = float(w.sum())
        if abs(s) >= 1e-8:
            mixed.div_(s)
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)


def _prep(base, deltas, weights, densities):
    dt = _work_dtype(base)
    b = base.to(dt)
    d = _stack(deltas, base, dt)
    k = d.shape[0]
    w = _vec(weights, k, dt, b.device, 1.0)
    dens = _vec(densities, k, dt, b.device, 1.0)
    return b, d, w, dens


def _finish(out: Tensor, base: Tensor, ws: Workspace | None) -> Tensor:
    return out.to(base.dtype) if out.dtype != base.dtype else out


# --------------------------------------------------------------------------------------------------
# operators


def linear(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    thresholds=None,
    noise=None,
    workspace: Workspace | None = None,
    normalize: bool = True,
    **_: Any,
) -> Tensor:
    """Weighted average of the *source models* (model soup): ``sum_t w_t theta_t / sum_t w_t``.

    The base is not one of the averaged models; it only serves as the origin of the task vectors, since
    ``sum_t w_t theta_t / sum_t w_t = theta0 + sum_t w_t tau_t / sum_t w_t`` (so a merge of identical
    models returns that model exactly up to float rounding). With ``normalize: false`` the result is
    ``sum_t w_t theta_t``, as in mergekit. mergekit divides by a zero weight sum (NaN); evomerge treats a
    weight sum with ``|sum| < 1e-8`` as 1 so a search never sees NaN weights. Matches mergekit's
    ``linear`` (every model listed with a weight, no base in the list) to float32 round-off.
    """
    b, d, w, _ = _prep(base, deltas, weights, densities)
    s = float(w.sum())
    if normalize:
        out = _ta_combine(b, d, w, True, 1.0, workspace)
    else:  # sum_t w_t theta_t = (sum_t w_t) theta0 + sum_t w_t tau_t
        out = _ta_combine(b * s, d, w, False, 1.0, workspace)
    return _finish(out, base, workspace)


def task_arithmetic(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    thresholds=None,
    noise=None,
    workspace: Workspace | None = None,
    normalize: bool = False,
    **params: Any,
) -> Tensor:
    """``theta0 + lambda * sum_t w_t tau_t`` (divided by ``sum_t w_t`` when ``normalize``).

    Densities are ignored. Matches mergekit's ``task_arithmetic`` (default ``normalize: false``).
    """
    b, d, w, _ = _prep(base, deltas, weights, densities)
    out = _ta_combine(b, d, w, bool(normalize), float(params.get("lambda", 1.0)), workspace)
    return _finish(out, base, workspace)


def ties(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    thresholds=None,
    noise=None,
    workspace: Workspace | None = None,
    normalize: bool = True,
    **params: Any,
) -> Tensor:
    """TIES-merging (Yadav et al. 2023) as mergekit 0.1.5's ``ties``.

    1. Trim: per tensor and per source keep the ``max(1, int(density * numel))`` entries of largest
       |tau| (per-tensor top-k, as mergekit; the paper trims the whole model at once). No rescale.
    2. Elect: the sign of ``sum_t w_t * trim(tau_t)`` per entry (>= 0 elects +).
    3. Disjoint merge: sum the weighted entries that agree with the elected sign and, with
       ``normalize`` (default true), divide by the sum of the weights of the agreeing entries (so with
       equal weights this is the paper's disjoint mean); then scale by ``lambda``.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0] == 0:
        return base.clone()
    if thresholds is None:
        thresholds = magnitude_thresholds(d, dens)
    wd = _magnitude_mask(d, thresholds, _buf(workspace, "A", d.shape, d)).mul_(d).mul_(_bcast(w, d))
    out = _ties_combine(b, wd, w, bool(normalize), float(params.get("lambda", 1.0)), workspace)
    return _finish(out, base, workspace)


def dare(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    thresholds=None,
    noise=None,
    workspace: Workspace | None = None,
    normalize: bool = False,
    rescale: Any = "inverse",
    **params: Any,
) -> Tensor:
    """DARE (Yu et al. 2023) followed by task arithmetic (mergekit's ``dare_linear``).

    Each entry of each task vector is kept with probability ``density`` (dropped with p = 1 - density),
    then rescaled:

    - ``rescale: inverse`` (evomerge's default): multiply the kept entries by ``1/density``, the
      paper's rule. It is unbiased entry by entry and needs no reduction over the tensor, so it stays a
      single streaming pass on the hot path, and it is a function of the density only (smooth for the
      search).
    - ``rescale: l1`` (or ``true``): mergekit 0.1.5's rule, scale each sparsified task vector so that its
      L1 norm equals the one before the drop. For large tensors it is within sampling noise of
      ``1/density``; use it to reproduce a mergekit config in distribution.
    - ``rescale: none`` (or ``false``): no rescale.

    The mask is ``u < density`` with ``u ~ U[0,1)`` drawn from ``generator`` (or given as ``noise``),
    so masks are nested across densities for a fixed seed. mergekit draws ``torch.bernoulli`` from the
    global RNG; the two agree in distribution, not bit for bit. When no density is below 1 nothing is
    drawn and the task vectors are used untouched, so DARE with density 1 is task arithmetic exactly.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0]:
        d, scale = _dare_sparsify(d, dens, generator, noise, rescale, workspace)
        w = w * scale
    out = _ta_combine(b, d, w, bool(normalize), float(params.get("lambda", 1.0)), workspace)
    return _finish(out, base, workspace)


def dare_ties(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    thresholds=None,
    noise=None,
    workspace: Workspace | None = None,
    normalize: bool = False,
    rescale: Any = "inverse",
    **params: Any,
) -> Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint merge (mergekit's ``dare_ties``).

    The drop and rescale are those of :func:`dare`; the election and merge those of :func:`ties`.
    mergekit's default is ``normalize: false`` for ``dare_ties`` (the agreeing weighted entries are
    summed, not averaged), and evomerge keeps it: the evolutionary-merge paper's best weights summed to
    about 2 under that convention. Set ``normalize: true`` for the disjoint mean.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0] == 0:
        return base.clone()
    d, scale = _dare_sparsify(d, dens, generator, noise, rescale, workspace)
    coef = _bcast(w * scale, d)
    if d.data_ptr() == (workspace.get("A", tuple(d.shape), d).data_ptr() if workspace is not None else -1):
        wd = d.mul_(coef)  # the masked copy lives in the workspace: scale it in place
    else:
        wd = d * coef
    out = _ties_combine(b, wd, w, bool(normalize), float(params.get("lambda", 1.0)), workspace)
    return _finish(out, base, workspace)


# --------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class OperatorSpec:
    """What a merge operator needs and which genes it reads.

    ``source_genes``: per-source genes read from each LayerGroup (``weight``, ``density``).
    ``params``: method-wide parameters and their defaults (``Recipe.params`` overrides them).
    ``needs_base``: whether the operator needs a base model (every operator here works on task vectors
    relative to a base; ``linear`` only uses it as an origin and its result does not depend on it).
    ``sparsify``: what the materializer should precompute: ``magnitude`` (sorted |tau| tables for
    threshold lookups), ``random`` (uniform draws for the DARE mask), or ``None``.
    ``mergekit_method``: the mergekit 0.1.5 method with the same semantics, for export/import.
    """

    name: str
    fn: Callable[..., Tensor]
    source_genes: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    sparsify: Sparsify = None
    mergekit_method: str | None = None
    description: str = ""


OPERATORS: dict[str, OperatorSpec] = {}


def register(spec: OperatorSpec) -> OperatorSpec:
    if spec.name in OPERATORS:
        raise ValueError(f"operator {spec.name!r} is already registered")
    OPERATORS[spec.name] = spec
    return spec


register(
    OperatorSpec(
        "linear",
        linear,
        ("weight",),
        {"normalize": True},
        needs_base=False,
        mergekit_method="linear",
        description="weighted average of the source models",
    )
)
register(
    OperatorSpec(
        "task_arithmetic",
        task_arithmetic,
        ("weight",),
        {"lambda": 1.0, "normalize": False},
        mergekit_method="task_arithmetic",
        description="theta0 + lambda sum w_t tau_t",
    )
)
register(
    OperatorSpec(
        "ties",
        ties,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": True},
        sparsify="magnitude",
        mergekit_method="ties",
        description="magnitude trim, sign election, disjoint merge",
    )
)
register(
    OperatorSpec(
        "dare",
        dare,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "rescale": "inverse"},
        sparsify="random",
        mergekit_method="dare_linear",
        description="random drop and rescale, then task arithmetic",
    )
)
register(
    OperatorSpec(
        "dare_ties",
        dare_ties,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "rescale": "inverse"},
        sparsify="random",
        mergekit_method="dare_ties",
        description="random drop and rescale, then TIES election and merge",
    )
)

#: mergekit method names accepted as aliases of evomerge operators.
ALIASES: dict[str, str] = {"dare_linear": "dare", "model_soup": "linear"}


def get_operator(name: str) -> OperatorSpec:
    key = ALIASES.get(name, name)
    try:
        return OPERATORS[key]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {sorted(OPERATORS)}") from None


def resolve_params(spec: OperatorSpec, params: dict[str, Any] | None) -> dict[str, Any]:
    """The operator's defaults overridden by a recipe's params; unknown keys are an error."""
    params = dict(params or {})
    unknown = set(params) - set(spec.params)
    if unknown:
        raise ValueError(f"method {spec.name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(spec.params)}")
    return {**spec.params, **params}
