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
- context an operator declares in its spec (:data:`CONTEXTS`): ``layer`` / ``num_layers`` (LiNeS,
  WIDEN), ``name``, ``fisher`` (``K x shape`` diagonal Fisher), ``source_tensor`` (passthrough), and
  ``ranks`` (DELLA's |tau| ranks, precomputed like ``thresholds``). Operators marked ``whole`` need
  the whole tensor (SVD, norms, sorts); the others are elementwise given these inputs and stream in
  chunks.

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
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "model_stock",
    "lines",
    "consensus",
    "pcb",
    "widen",
    "tsv_m",
    "passthrough",
    "fisher",
    "breadcrumb_thresholds",
    "della_ranks",
    "della_keep_prob",
    "lines_scale",
    "CONTEXTS",
    "magnitude_thresholds",
    "trim_count",
    "resolve_params",
    "Workspace",
]

Sparsify = Literal["magnitude", "outliers", "random", "della"] | None


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

    Density >= 1 keeps every entry, density <= 0 keeps none. The density is rounded to 7 decimals first,
    so a float32 gene of 0.95 (0.94999999) counts like mergekit's Python float 0.95.
    """
    density = round(float(density), 7)
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
# more sparsifications: breadcrumbs (magnitude band) and DELLA (magnitude-ranked random drop)


def breadcrumb_thresholds(deltas: Tensor, densities: Tensor, gamma: float) -> Tensor:
    """Per source, ``(lo, hi)``: the |tau| band that mergekit's ``magnitude_outliers`` keeps.

    mergekit drops the ``int(gamma * n)`` largest entries (fewer when that would leave less than the
    target), then the smallest, keeping ``int(density * n)`` entries: in descending order of |tau| the
    kept ranks are ``[h, h + int(density * n))`` with ``h = min(int(gamma * n), n - int(density * n))``.
    An entry is kept when ``lo <= |tau| <= hi``. Density >= 1 keeps everything (mergekit returns the
    tensor untouched, outliers included); a target of 0 keeps nothing.
    """
    k = deltas.shape[0]
    out = torch.empty(k, 2, dtype=torch.float32)
    for i in range(k):
        flat = deltas[i].reshape(-1).abs().float()
        n = flat.numel()
        lo, hi = _band(
            float(densities[i]), float(gamma), n, lambda j, flat=flat, n=n: float(flat.kthvalue(n - j).values)
        )
        out[i, 0], out[i, 1] = lo, hi
    return out


def _band(density: float, gamma: float, n: int, desc_value: Callable[[int], float]) -> tuple[float, float]:
    """``(lo, hi)`` of a breadcrumbs band given ``desc_value(j)``, the j-th largest |tau| (0-based)."""
    density, gamma = round(float(density), 7), round(float(gamma), 7)  # float32 genes count like mergekit's floats
    if density >= 1 or n == 0:
        return -math.inf, math.inf
    target = int(density * n)
    if target <= 0:
        return math.inf, math.inf
    h = min(int(gamma * n), n - target)
    lo = desc_value(h + target - 1)
    hi = desc_value(h) if h > 0 else math.inf
    return lo, hi


def _band_mask(d: Tensor, thresholds: Tensor, out: Tensor) -> Tensor:
    thr = thresholds.to(d.device, d.dtype).reshape(-1, 2)
    a = d.abs()
    lo = _bcast(thr[:, 0].contiguous(), d)
    hi = _bcast(thr[:, 1].contiguous(), d)
    return out.copy_((a >= lo) & (a <= hi))


def della_ranks(deltas: Tensor) -> Tensor:
    """Per source, the normalised ascending rank of |tau| within the tensor, in [0, 1] (exact, by sort)."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1).abs().float()
    n = flat.shape[1]
    order = torch.argsort(flat, dim=1, stable=True)
    ranks = torch.empty_like(flat)
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.float32, device=flat.device).expand(k, n).contiguous())
    if n > 1:
        ranks.div_(n - 1)
    return ranks.reshape(deltas.shape)


def della_keep_prob(ranks: Tensor, dens: Tensor, epsilon: float) -> Tensor:
    """DELLA's keep probability ``density - eps + 2 eps * rank`` (clamped to [0, 1]); 1 where density >= 1,
    0 where density <= 0 (as mergekit)."""
    dn = _bcast(dens.to(ranks.device, torch.float32), ranks)
    p = (dn - epsilon + 2.0 * epsilon * ranks.float()).clamp_(0.0, 1.0)
    p = torch.where(dn <= 0, torch.zeros_like(p), p)
    return torch.where(dn >= 1, torch.ones_like(p), p)


def _della_sparsify(d, dens, epsilon, ranks, generator, noise, rescale) -> tuple[Tensor, Tensor]:
    k = d.shape[0]
    mode = _rescale_mode(rescale)
    ones = torch.ones(k, dtype=d.dtype, device=d.device)
    if not bool((dens < 1).any()):
        return d, ones
    if ranks is None:
        ranks = della_ranks(d)
    if noise is None:
        noise = torch.rand(d.shape, generator=generator, device=d.device, dtype=torch.float32)
    p = della_keep_prob(ranks.to(d.device), dens, epsilon).to(d.dtype)
    keep = (noise.to(d.device, d.dtype) < p).to(d.dtype)
    masked = d * keep
    if mode == "inverse":  # the paper's per-entry rescale 1/p_keep
        masked = masked / torch.where(keep > 0, p, torch.ones_like(p))
        return masked, ones
    if mode == "none":
        return masked, ones
    before = d.reshape(k, -1).abs().sum(1)
    after = masked.reshape(k, -1).abs().sum(1)
    ok = (before >= 1e-7) & (after >= 1e-7) & (dens < 1).to(d.device)
    return masked, torch.where(ok, before / after.clamp_min(1e-30), torch.ones_like(before))


# --------------------------------------------------------------------------------------------------
# breadcrumbs, DELLA


def breadcrumbs(
    base, deltas, weights, densities=None, *, thresholds=None, workspace=None, normalize=False, gamma=0.01, **params
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023) as mergekit 0.1.5's ``breadcrumbs``.

    Per tensor and source, drop the ``gamma`` fraction of largest |tau| (outliers) and then the smallest,
    so that ``density`` of the entries remain (see :func:`breadcrumb_thresholds`), then task arithmetic
    (``normalize`` false, ``lambda``), no rescale. ``gamma`` is method-wide here (mergekit allows it per
    model); a band is selected by two thresholds, so exact ties of |tau| at a band edge are all kept.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0]:
        if thresholds is None:
            thresholds = breadcrumb_thresholds(d, dens, float(gamma))
        d = _band_mask(d, thresholds, torch.empty_like(d)).mul_(d)
    out = _ta_combine(b, d, w, bool(normalize), float(params.get("lambda", 1.0)))
    return _finish(out, base, None)


def breadcrumbs_ties(
    base, deltas, weights, densities=None, *, thresholds=None, workspace=None, normalize=False, gamma=0.01, **params
) -> Tensor:
    """Breadcrumbs sparsification, then TIES sign election and disjoint merge (mergekit's
    ``breadcrumbs_ties``; default ``normalize: false`` as mergekit)."""
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0] == 0:
        return base.clone()
    if thresholds is None:
        thresholds = breadcrumb_thresholds(d, dens, float(gamma))
    wd = _band_mask(d, thresholds, torch.empty_like(d)).mul_(d).mul_(_bcast(w, d))
    out = _ties_combine(b, wd, w, bool(normalize), float(params.get("lambda", 1.0)), None)
    return _finish(out, base, None)


def della(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    noise=None,
    ranks=None,
    workspace=None,
    normalize=True,
    rescale="inverse",
    epsilon=0.15,
    **params,
) -> Tensor:
    """DELLA-merging (Deep et al. 2024): MagPrune drop, rescale, TIES election, disjoint merge
    (mergekit's ``della``).

    MagPrune keeps entry ``i`` with probability ``density - epsilon + 2 epsilon r_i`` where ``r_i`` in
    [0, 1] is the normalised rank of |tau_i| (smallest 0, largest 1). Conventions, and why:

    - ranks are taken within the whole tensor (as TIES trims per tensor); mergekit 0.1.5 ranks within
      each row of a matrix. For the materializer a per-tensor rank is a lookup in a precomputed
      cumulative histogram of |tau| (``ranks`` given), with no per-candidate sort.
    - ``rescale: inverse`` (default) multiplies each kept entry by ``1/p_i``, the paper's rule
      (unbiased per entry, streaming); ``l1`` is mergekit's ``rescale: true`` (match the L1 norm);
      ``none``.
    - probabilities are clamped to [0, 1] rather than rejecting ``density +- epsilon`` outside (0, 1)
      as mergekit does, so every point of a search space is valid.

    The drop draws ``u ~ U[0,1)`` per entry (``noise``, or from ``generator``): keep when ``u < p``.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0] == 0:
        return base.clone()
    d, scale = _della_sparsify(d, dens, float(epsilon), ranks, generator, noise, rescale)
    wd = d * _bcast(w * scale, d)
    out = _ties_combine(b, wd, w, bool(normalize), float(params.get("lambda", 1.0)), None)
    return _finish(out, base, None)


def della_linear(
    base,
    deltas,
    weights,
    densities=None,
    *,
    generator=None,
    noise=None,
    ranks=None,
    workspace=None,
    normalize=False,
    rescale="inverse",
    epsilon=0.15,
    **params,
) -> Tensor:
    """DELLA's MagPrune drop and rescale, then task arithmetic (mergekit's ``della_linear``)."""
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0]:
        d, scale = _della_sparsify(d, dens, float(epsilon), ranks, generator, noise, rescale)
        w = w * scale
    out = _ta_combine(b, d, w, bool(normalize), float(params.get("lambda", 1.0)))
    return _finish(out, base, None)


# --------------------------------------------------------------------------------------------------
# SLERP, model stock


def _slerp_pair(a: Tensor, c: Tensor, t: float, per_row: bool, dot_threshold: float, eps: float) -> Tensor:
    shape = a.shape
    if per_row and a.dim() >= 1:
        A, C = a.reshape(shape[0], -1), c.reshape(shape[0], -1)
    else:
        A, C = a.reshape(1, -1), c.reshape(1, -1)
    if A.shape[1] == 0:
        return a.clone()
    na = torch.linalg.vector_norm(A, dim=1, keepdim=True)
    nc = torch.linalg.vector_norm(C, dim=1, keepdim=True)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nc = torch.where(nc > eps, nc, torch.ones_like(nc))
    dot = ((A / na) * (C / nc)).sum(dim=1, keepdim=True).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, torch.zeros_like(dot), dot))
    st = torch.sin(theta)
    st = torch.where(lin, torch.ones_like(st), st)
    ca = torch.where(lin, torch.full_like(dot, 1 - t), torch.sin((1 - t) * theta) / st)
    cc = torch.where(lin, torch.full_like(dot, t), torch.sin(t * theta) / st)
    return (ca * A + cc * C).reshape(shape)


def slerp(
    base,
    deltas,
    weights=None,
    densities=None,
    *,
    t: float = 0.5,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    per_row: bool = False,
    workspace=None,
    **_: Any,
) -> Tensor:
    """Spherical interpolation of two models: ``t = 0`` gives the first, ``t = 1`` the second.

    With one source the two models are the base (t = 0) and the source (t = 1), as mergekit's
    ``slerp`` with ``base_model`` and one other model; with two sources they are source 0 and source 1
    (the base is only the origin of the task vectors). Weights and densities are not used; ``t`` is the
    gene (a layer group may override it).

    Convention: as mergekit 0.1.5 (whose kernel's leading axis is a batch of whole tensors, checked
    tensor by tensor in the parity tests), the angle is that of the two whole flattened tensors;
    ``per_row: true`` takes one angle per row of the leading (output) axis instead. When the normalised
    dot product exceeds ``dot_threshold`` in magnitude (nearly colinear or antipodal) it falls back to
    linear interpolation. Endpoints are returned exactly (t = 0 and t = 1 return the end models).
    """
    b, d, _, _ = _prep(base, deltas, None, None)
    k = d.shape[0]
    if k == 1:
        a, c = b, b + d[0]
    elif k == 2:
        a, c = b + d[0], b + d[1]
    else:
        raise ValueError(f"slerp interpolates two models (the base and one source, or two sources), got {k} sources")
    t = float(t)
    if t == 0:
        out = a
    elif t == 1:
        out = c
    else:
        out = _slerp_pair(a, c, t, bool(per_row), float(dot_threshold), float(eps))
    return _finish(out, base, None)


def slerp_stats(base: Tensor, deltas: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``[|a|, |c|, <a, c>]`` (float64) of SLERP's two end models of one tensor (see :func:`slerp`).

    They do not depend on ``t``, so a materializer computes them once per tensor and each candidate is
    then a linear combination (:func:`slerp_linear`) at the cost of task arithmetic. Accumulated in
    float64 over float32 chunks, so the temporaries stay ``chunk`` entries large.
    """
    k = deltas.shape[0]
    if k not in (1, 2):
        raise ValueError(f"slerp interpolates two models, got {k} sources")
    b = base.reshape(-1)
    d = deltas.reshape(k, -1)
    acc = torch.zeros(3, dtype=torch.float64)
    for s in range(0, b.numel(), chunk):
        bb = b[s : s + chunk].float()
        a = bb + d[0, s : s + chunk].float() if k == 2 else bb
        c = bb + d[k - 1, s : s + chunk].float()
        acc[0] += float(torch.dot(a, a))
        acc[1] += float(torch.dot(c, c))
        acc[2] += float(torch.dot(a, c))
    return torch.stack([acc[0].sqrt(), acc[1].sqrt(), acc[2]])


def slerp_linear(
    stats: Tensor, k: int, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, list[float]]:
    """SLERP of one whole tensor as ``bscale * base + sum_i coef_i * tau_i`` from :func:`slerp_stats`.

    ``slerp(a, c) = ca a + cc c`` with scalar ``ca, cc`` (whole-tensor angle), and ``a, c`` are the base
    or ``base + tau_i``, so the result is linear in the base and the task vectors. Same conventions as
    :func:`slerp` (norms under ``eps`` count as 1, the linear fallback above ``dot_threshold``, exact
    end points).
    """
    t = float(t)
    if t == 0:
        ca, cc = 1.0, 0.0
    elif t == 1:
        ca, cc = 0.0, 1.0
    else:
        na, nc, dot = (float(x) for x in stats)
        na = na if na > eps else 1.0
        nc = nc if nc > eps else 1.0
        cos = max(-1.0, min(1.0, dot / (na * nc)))
        if abs(cos) > dot_threshold:
            ca, cc = 1 - t, t
        else:
            theta = math.acos(cos)
            st = math.sin(theta)
            ca, cc = math.sin((1 - t) * theta) / st, math.sin(t * theta) / st
    if k == 1:  # a = base, c = base + tau_0
        return ca + cc, [cc]
    return ca + cc, [ca, cc]  # a = base + tau_0, c = base + tau_1


def model_stock_stats(base: Tensor, deltas: Tensor) -> Tensor:
    """Model Stock's mean pairwise cosine of the task vectors of one whole tensor (float64, shape 1)."""
    k = deltas.shape[0]
    rows = deltas.reshape(k, -1).float()
    norms = torch.linalg.vector_norm(rows, dim=-1)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            c = float(torch.dot(rows[i], rows[j])) / max(float(norms[i] * norms[j]), 1e-6)
            cos.append(min(1.0, max(-1.0, c)))
    return torch.tensor([sum(cos) / len(cos)], dtype=torch.float64)


def model_stock_linear(stats: Tensor, k: int) -> tuple[float, list[float]]:
    """Model Stock of one whole tensor as ``base + sum_i (t / k) tau_i`` from :func:`model_stock_stats`."""
    cos = float(stats[0])
    den = 1 + (k - 1) * cos
    t = 0.0 if abs(den) < 1e-6 else k * cos / den
    return 1.0, [t / k] * k


def model_stock(
    base, deltas, weights=None, densities=None, *, filter_wise: bool = False, workspace=None, **_
) -> Tensor:
    """Model Stock (Jang et al. 2024) as mergekit 0.1.5's ``model_stock``.

    With ``k >= 2`` fine-tuned models, ``cos`` is the mean over pairs of the cosine between their task
    vectors (per tensor, or per row with ``filter_wise``), ``t = k cos / (1 + (k - 1) cos)``, and the
    result is ``t * mean(theta_t) + (1 - t) * theta0 = theta0 + t * mean(tau_t)``. Where the denominator
    vanishes (|.| < 1e-6) the base is kept (t = 0), as mergekit. Weights and densities are not used.
    """
    b, d, _, _ = _prep(base, deltas, None, None)
    k = d.shape[0]
    if k < 2:
        raise ValueError("model_stock needs at least two source models")
    if filter_wise and b.dim() >= 1:
        rows = d.reshape(k, b.shape[0] if b.dim() >= 2 else 1, -1)
    else:
        rows = d.reshape(k, 1, -1)
    norms = torch.linalg.vector_norm(rows, dim=-1)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            c = (rows[i] * rows[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    cos_t = torch.stack(cos).mean(0).unsqueeze(-1)
    den = 1 + (k - 1) * cos_t
    sing = den.abs() < 1e-6
    tt = torch.where(sing, torch.zeros_like(cos_t), k * cos_t / torch.where(sing, torch.ones_like(den), den))
    avg = rows.mean(0)
    out = b + (tt * avg).reshape(b.shape)
    return _finish(out, base, None)


# --------------------------------------------------------------------------------------------------
# operators over a base merge: LiNeS, Consensus / TALL masks


def _base_merge(base_method: str, base_params, base, deltas, weights, densities, kw) -> Tensor:
    spec = get_operator(base_method)
    if spec.name in ("lines", "consensus"):
        raise ValueError(f"base_method {base_method!r} cannot itself wrap a base merge")
    passed = {
        key: kw[key] for key in ("generator", "thresholds", "noise", "ranks", "fisher") if kw.get(key) is not None
    }
    return spec.fn(base, deltas, weights, densities, **passed, **resolve_params(spec, base_params))


def lines_scale(layer: int | str | None, num_layers: int | None, alpha: float, beta: float) -> float:
    """LiNeS coefficient of a tensor: alpha + beta * l / (L - 1) for block l of L; the embeddings take
    alpha (depth 0) and the tensors after the blocks (final norm, head) alpha + beta (depth 1)."""
    if isinstance(layer, int) and not isinstance(layer, bool):
        if num_layers is None or num_layers <= 1:
            return float(alpha)
        return float(alpha) + float(beta) * layer / (num_layers - 1)
    if layer == "head":
        return float(alpha) + float(beta)
    return float(alpha)


def lines(
    base,
    deltas,
    weights,
    densities=None,
    *,
    layer=None,
    num_layers=None,
    alpha: float = 1.0,
    beta: float = 0.0,
    base_method: str = "task_arithmetic",
    base_params: dict | None = None,
    workspace=None,
    **kw: Any,
) -> Tensor:
    """LiNeS (Wang et al. 2024): scale the merged task vector of block ``l`` by ``alpha + beta l/(L-1)``.

    The merged task vector is that of ``base_method`` (any operator that does not itself wrap one) with
    ``base_params``; shallow blocks keep less of it than deep ones when ``beta > 0``, which protects
    the base model's general features. Needs the block index: the materializer passes ``layer`` (block
    index, ``"embed"`` or ``"head"``) and ``num_layers``. With alpha = 1, beta = 0 (the defaults) the
    result is the base merge exactly.
    """
    merged = _base_merge(base_method, base_params, base, deltas, weights, densities, kw)
    s = lines_scale(layer, num_layers, alpha, beta)
    if s == 1.0:
        return merged
    dt = _work_dtype(base)
    b = base.to(dt)
    return _finish(b + s * (merged.to(dt) - b), base, None)


def consensus(
    base,
    deltas,
    weights,
    densities=None,
    *,
    k: int = 2,
    mask_lambda: float | Sequence[float] = 0.4,
    base_method: str = "task_arithmetic",
    base_params: dict | None = None,
    workspace=None,
    **kw: Any,
) -> Tensor:
    """Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information...").

    ``tau_MTL = sum_t tau_t`` (unweighted, as the paper); source t's TALL mask is
    ``|tau_t| >= lambda_t |tau_MTL - tau_t|`` (``mask_lambda``: one value or one per source); entries
    where at least ``k`` masks are set keep the ``base_method`` merge, the others fall back to the base.
    ``k <= 0`` returns the base merge exactly. Elementwise, so it streams in chunks like its base merge.
    """
    merged = _base_merge(base_method, base_params, base, deltas, weights, densities, kw)
    if int(k) <= 0:
        return merged
    dt = _work_dtype(base)
    d = _stack(deltas, base, dt)
    kk = d.shape[0]
    lam = _vec(
        mask_lambda if isinstance(mask_lambda, (list, tuple, Tensor)) else [float(mask_lambda)] * kk,
        kk,
        dt,
        d.device,
        0.4,
    )
    mtl = d.sum(0)
    count = (d.abs() >= _bcast(lam, d) * (mtl - d).abs()).sum(0)
    return torch.where(count >= int(k), merged, base.to(merged.dtype))


# --------------------------------------------------------------------------------------------------
# PCB, WIDEN, TSV-M


def _minmax(x: Tensor, dim: int) -> Tensor:
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _clamp_quantile(x: Tensor, lo_ratio: Tensor | float, hi_ratio: float) -> Tensor:
    """Clamp each row of ``x`` (K x n) to its sorted values at ``int(n lo_ratio)`` and
    ``int(n (1 - hi_ratio)) - 1`` (the PCB reference code's ``clamp``)."""
    k, n = x.shape
    s = torch.sort(x, dim=1).values
    lo_r = torch.as_tensor(lo_ratio, dtype=torch.float64).reshape(-1).expand(k)
    lo_i = torch.tensor([min(n - 1, max(0, int(n * float(r)))) for r in lo_r])
    hi_i = min(n - 1, max(0, int(n * (1 - hi_ratio)) - 1))
    lo = s.gather(1, lo_i.view(k, 1).to(s.device))
    hi = s[:, hi_i : hi_i + 1]
    return torch.minimum(torch.maximum(x, lo), torch.maximum(hi, lo))


def pcb(base, deltas, weights, densities=None, *, workspace=None, outlier: float = 1e-4, **params: Any) -> Tensor:
    """PCB-merging (Du et al. 2024, parameter competition balancing), per tensor.

    After the authors' reference code, on the flattened tensor with task vectors ``tau_t`` (scaled by
    their weights): clip each source's |tau| at its ``outlier`` quantiles; intra-balancing
    ``exp(K * minmax(|tau_t|)^2)``; inter-balancing ``tanh(tau_t * sum_s tau_s)``; their product is the
    score; scores below each source's ``1 - density`` quantile are raised to it and min-max normalised
    (so the bottom ``1 - density`` get 0: the drop); the merge is the score-weighted mean of the clipped
    task vectors, scaled by ``lambda``. The reference code ranks over the whole model at once and uses
    one ratio for all tasks; evomerge works per tensor and takes the ratio per source (the density
    gene). Min-max divisions by zero give 0 (the reference would give NaN).
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    k = d.shape[0]
    if k == 0 or b.numel() == 0:
        return base.clone()
    x = d.reshape(k, -1) * w.view(k, 1)
    ab = _clamp_quantile(x.abs(), float(outlier), float(outlier))
    clipped = torch.sign(x) * ab
    self_pcb = torch.exp(k * _minmax(ab, 1) ** 2)
    cross = torch.tanh(x * x.sum(0, keepdim=True))
    score = self_pcb * cross
    scale = _minmax(_clamp_quantile(score, (1 - dens.clamp(0, 1)).tolist(), 0.0), 1)
    merged = (clipped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    out = b + float(params.get("lambda", 1.0)) * merged.reshape(b.shape)
    return _finish(out, base, None)


def _rank_significance(x: Tensor) -> Tensor:
    """Per row of ``x`` (K x n): position / n of each entry in ascending stable order (WIDEN's rank)."""
    k, n = x.shape
    order = torch.argsort(x, dim=1, stable=True)
    pos = (torch.arange(n, dtype=x.dtype, device=x.device) / n).expand(k, n).contiguous()
    return torch.zeros_like(x).scatter_(1, order, pos)


def _widen_scores(sig: Tensor, ratio: float, calibration: float) -> Tensor:
    scores = torch.softmax(sig, dim=0)
    mask = sig > sig.mean(dim=1, keepdim=True) * ratio
    return torch.where(mask, torch.full_like(scores, calibration), scores)


def widen(
    base,
    deltas,
    weights,
    densities=None,
    *,
    layer=None,
    name: str | None = None,
    workspace=None,
    above_average_ratio: float = 1.0,
    calibration: float = 1.0,
    **_: Any,
) -> Tensor:
    """WIDEN (Yu et al. 2024, weight disentanglement), after the authors' MergeLLM code.

    For a matrix (``out x in``; the token embedding is transposed first so its columns are tokens):
    per column, the magnitude change ``|‖W_t‖ - ‖W_0‖|`` and the direction change
    ``1 - cos(W_t, W_0)`` of each source; each is ranked within the source (position / n); importance
    scores are the softmax over sources of the ranks, set to ``calibration`` where a rank exceeds
    ``above_average_ratio`` times the source's mean rank; the merge adds ``sum_t w_t s_t tau_t`` with
    ``s_t`` the mean of the magnitude and direction scores, per column. Vectors (norms, biases) use
    ``|tau_t|`` itself as the significance, elementwise. Weights (1 in the paper) scale each source.
    """
    b, d, w, _ = _prep(base, deltas, weights, None)
    k = d.shape[0]
    if k == 0:
        return base.clone()
    ratio, cal = float(above_average_ratio), float(calibration)
    if b.dim() == 2:
        transpose = layer == "embed" or (name is not None and "embed" in name)
        B = b.t() if transpose else b
        D = d.transpose(1, 2) if transpose else d
        T = B.unsqueeze(0) + D
        m0 = torch.linalg.vector_norm(B, dim=0)
        mt = torch.linalg.vector_norm(T, dim=1)
        dm = (mt - m0).abs()
        dd = 1.0 - torch.cosine_similarity(T, B.unsqueeze(0).expand_as(T), dim=1)
        s = 0.5 * (
            _widen_scores(_rank_significance(dm), ratio, cal) + _widen_scores(_rank_significance(dd), ratio, cal)
        )
        merged = (D * (s * w.view(k, 1)).unsqueeze(1)).sum(0)
        out = B + merged
        out = out.t() if transpose else out
    else:
        flat = d.reshape(k, -1)
        s = _widen_scores(flat.abs(), ratio, cal)
        out = b + (flat * s * w.view(k, 1)).sum(0).reshape(b.shape)
    return _finish(out.contiguous(), base, None)


def _orthogonalise(m: Tensor) -> Tensor:
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def tsv_m(
    base, deltas, weights, densities=None, *, fraction: float | None = None, alpha: float = 1.0, workspace=None, **_
) -> Tensor:
    """TSV-Merge (Gargiulo et al. 2025, task singular vectors), per 2-D tensor.

    Each weighted task vector ``w_t tau_t = U_t S_t V_t^T`` keeps its top ``fraction`` of singular
    components (default 1/K, the paper's choice; at least one); the kept ``U``'s are concatenated and
    orthogonalised (``U = P S Q^T -> P Q^T``), the ``V``'s likewise, and the merged task vector is
    ``U_perp diag(S) V_perp^T``, scaled by ``alpha``. Other tensors (norms, biases) average the
    weighted task vectors, as the reference code does.
    """
    b, d, w, _ = _prep(base, deltas, weights, None)
    k = d.shape[0]
    if k == 0:
        return base.clone()
    wd = d * _bcast(w, d)
    if b.dim() == 2 and min(b.shape) > 0:
        r_all = min(b.shape)
        frac = (1.0 / k) if fraction is None else float(fraction)
        r = max(1, min(r_all, int(frac * r_all)))
        us, ss, vs = [], [], []
        for i in range(k):
            u, s, vh = torch.linalg.svd(wd[i], full_matrices=False)
            us.append(u[:, :r])
            ss.append(s[:r])
            vs.append(vh[:r].t())
        U, S, V = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
        merged = (_orthogonalise(U) * S) @ _orthogonalise(V).t()
    else:
        merged = wd.mean(0)
    out = b + float(alpha) * merged
    return _finish(out, base, None)


# --------------------------------------------------------------------------------------------------
# passthrough, Fisher


def passthrough(
    base,
    deltas,
    weights=None,
    densities=None,
    *,
    source: int = 0,
    scale: float = 1.0,
    source_tensor: Tensor | None = None,
    workspace=None,
    **_: Any,
) -> Tensor:
    """One model's tensor as it is (times ``scale``): ``source`` indexes the sources, ``-1`` the base.

    A layer group may override ``source`` (and ``scale``), so a recipe can take each block from a
    different model (a frankenmerge at the base's depth; to stack layers into a deeper model use
    :meth:`Materializer.stacked_state_dict`). The materializer passes ``source_tensor``, the tensor
    read from the source's checkpoint, so a passthrough of a whole model is bit-exact; without it the
    result is ``theta0 + tau_source`` (float round-off of the task vector).
    """
    src = int(source)
    if source_tensor is not None:
        out = source_tensor.to(base.device)
    elif src < 0:
        out = base
    else:
        d = _stack(deltas, base, _work_dtype(base))
        if not 0 <= src < d.shape[0]:
            raise ValueError(f"passthrough source {src} out of range for {d.shape[0]} sources")
        out = base.to(d.dtype) + d[src]
    if float(scale) != 1.0:
        out = out.to(_work_dtype(base)) * float(scale)
    return torch.empty_like(base).copy_(out)


def fisher(
    base,
    deltas,
    weights,
    densities=None,
    *,
    fisher: Tensor | Sequence[Tensor] | None = None,
    fisher_floor: float = 1e-12,
    workspace=None,
    **params: Any,
) -> Tensor:
    """Fisher-weighted averaging (Matena & Raffel 2022): ``sum_t w_t F_t theta_t / sum_t w_t F_t``.

    ``F_t`` is source t's diagonal Fisher (``K x shape``; the materializer computes and caches it with
    :meth:`Materializer.compute_fisher`), plus ``fisher_floor`` so an entry no source's data touched
    becomes the plain weighted average. Written as ``theta0 + sum w F tau / sum w F``; a zero divisor
    becomes 1 (base kept). Without ``fisher`` it is the weighted average (``linear``).
    """
    b, d, w, _ = _prep(base, deltas, weights, None)
    k = d.shape[0]
    if k == 0:
        return base.clone()
    F = torch.ones_like(d) if fisher is None else _stack(fisher, base, d.dtype)
    wf = (F + float(fisher_floor)) * _bcast(w, d)
    den = wf.sum(0)
    den = torch.where(den == 0, torch.ones_like(den), den)
    out = b + (wf * d).sum(0) / den
    return _finish(out, base, None)


# --------------------------------------------------------------------------------------------------
# registry

#: what an operator can ask the materializer for, beyond base, task vectors, weights and densities:
#: ``layer`` (``layer``: block index / "embed" / "head", and ``num_layers``), ``name`` (the tensor's
#: checkpoint name), ``whole`` (the whole tensor at once: no chunked streaming), ``fisher`` (``K x
#: shape`` diagonal Fisher of each source), ``source_tensor`` (the selected source's tensor as stored).
CONTEXTS = frozenset({"layer", "name", "whole", "fisher", "source_tensor"})


@dataclass(frozen=True)
class OperatorSpec:
    """What a merge operator needs and which genes it reads.

    ``source_genes``: per-source genes read from each LayerGroup (``weight``, ``density``).
    ``params``: method-wide parameters and their defaults (``Recipe.params`` overrides them).
    ``group_params``: the params a layer group may override (genes per group, e.g. SLERP's ``t``);
    the materializer reads them from a group's ``params`` mapping when the recipe's groups carry one.
    ``needs_base``: whether the operator needs a base model (``linear`` only uses it as an origin).
    ``sparsify``: what the materializer precomputes per tensor: ``magnitude`` (top-k threshold from a
    sorted-|tau| index), ``outliers`` (a breadcrumbs band, same index), ``random`` (uniform draws for
    a DARE mask), ``della`` (uniform draws and |tau| ranks from a cumulative histogram), or ``None``.
    Operators that wrap a base merge (``base_method`` param) take that method's needs.
    ``context``: extra inputs (see :data:`CONTEXTS`).
    ``min_sources`` / ``max_sources``: how many source models the operator takes.
    ``mergekit_method``: the mergekit 0.1.5 method with the same semantics, for export/import.
    ``stats`` / ``linear``: for operators whose whole-tensor statistics do not depend on the genes
    (SLERP's angle, Model Stock's cosine): ``stats(base, deltas)`` is computed once per tensor and
    ``linear(stats, k, **params)`` turns it into ``(bscale, coefs)`` with merged ``= bscale * base +
    sum_i coefs_i * tau_i`` (or ``None`` when these params need the operator itself), so a candidate
    streams like task arithmetic instead of taking the whole tensor at once.
    """

    name: str
    fn: Callable[..., Tensor]
    source_genes: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    sparsify: str | None = None
    mergekit_method: str | None = None
    description: str = ""
    group_params: tuple[str, ...] = ()
    context: frozenset[str] = frozenset()
    min_sources: int = 1
    max_sources: int | None = None
    stats: Callable[[Tensor, Tensor], Tensor] | None = None
    linear: Callable[..., tuple[float, list[float]] | None] | None = None

    def __post_init__(self) -> None:
        bad = set(self.context) - CONTEXTS
        if bad:
            raise ValueError(f"{self.name}: unknown context {sorted(bad)}")
        if self.sparsify not in (None, "magnitude", "outliers", "random", "della"):
            raise ValueError(f"{self.name}: unknown sparsify {self.sparsify!r}")

    def resolved(self, params: dict[str, Any]) -> tuple[str | None, frozenset[str]]:
        """``(sparsify, context)`` for these params: a wrapper adds its base method's needs."""
        sp, ctx = self.sparsify, set(self.context)
        bm = params.get("base_method") if "base_method" in self.params else None
        if bm is not None:
            inner = get_operator(bm)
            isp, ictx = inner.resolved(resolve_params(inner, params.get("base_params")))
            sp = sp or isp
            ctx |= ictx
        return sp, frozenset(ctx)

    def check_sources(self, k: int) -> None:
        if k < self.min_sources or (self.max_sources is not None and k > self.max_sources):
            hi = "" if self.max_sources is None else f" and at most {self.max_sources}"
            raise ValueError(f"method {self.name!r} takes at least {self.min_sources}{hi} source models, got {k}")


OPERATORS: dict[str, OperatorSpec] = {}


def register(spec: OperatorSpec) -> OperatorSpec:
    if spec.name in OPERATORS:
        raise ValueError(f"operator {spec.name!r} is already registered")
    OPERATORS[spec.name] = spec
    return spec


_WRAP = {"base_method": "task_arithmetic", "base_params": {}}

for _spec in (
    OperatorSpec(
        "linear",
        linear,
        ("weight",),
        {"normalize": True},
        needs_base=False,
        mergekit_method="linear",
        description="weighted average of the source models",
    ),
    OperatorSpec(
        "task_arithmetic",
        task_arithmetic,
        ("weight",),
        {"lambda": 1.0, "normalize": False},
        mergekit_method="task_arithmetic",
        description="theta0 + lambda sum w_t tau_t",
    ),
    OperatorSpec(
        "ties",
        ties,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": True},
        sparsify="magnitude",
        mergekit_method="ties",
        description="magnitude trim, sign election, disjoint merge",
    ),
    OperatorSpec(
        "dare",
        dare,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "rescale": "inverse"},
        sparsify="random",
        mergekit_method="dare_linear",
        description="random drop and rescale, then task arithmetic",
    ),
    OperatorSpec(
        "dare_ties",
        dare_ties,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "rescale": "inverse"},
        sparsify="random",
        mergekit_method="dare_ties",
        description="random drop and rescale, then TIES election and merge",
    ),
    OperatorSpec(
        "breadcrumbs",
        breadcrumbs,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "gamma": 0.01},
        sparsify="outliers",
        mergekit_method="breadcrumbs",
        description="drop largest gamma and smallest |tau|, task arithmetic",
    ),
    OperatorSpec(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "gamma": 0.01},
        sparsify="outliers",
        mergekit_method="breadcrumbs_ties",
        description="breadcrumbs band, then TIES election and merge",
    ),
    OperatorSpec(
        "della",
        della,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": True, "rescale": "inverse", "epsilon": 0.15},
        sparsify="della",
        mergekit_method="della",
        description="magnitude-ranked random drop, TIES election and merge",
    ),
    OperatorSpec(
        "della_linear",
        della_linear,
        ("weight", "density"),
        {"lambda": 1.0, "normalize": False, "rescale": "inverse", "epsilon": 0.15},
        sparsify="della",
        mergekit_method="della_linear",
        description="magnitude-ranked random drop, task arithmetic",
    ),
    OperatorSpec(
        "slerp",
        slerp,
        (),
        {"t": 0.5, "dot_threshold": 0.9995, "eps": 1e-8, "per_row": False},
        group_params=("t",),
        context=frozenset({"whole"}),
        min_sources=1,
        max_sources=2,
        stats=slerp_stats,
        linear=lambda stats, k, t=0.5, dot_threshold=0.9995, eps=1e-8, per_row=False, **_: (
            None if per_row else slerp_linear(stats, k, t, dot_threshold, eps)
        ),
        mergekit_method="slerp",
        description="spherical interpolation of two models",
    ),
    OperatorSpec(
        "model_stock",
        model_stock,
        (),
        {"filter_wise": False},
        context=frozenset({"whole"}),
        min_sources=2,
        stats=model_stock_stats,
        linear=lambda stats, k, filter_wise=False, **_: None if filter_wise else model_stock_linear(stats, k),
        mergekit_method="model_stock",
        description="average moved towards the base by the task vectors' angle",
    ),
    OperatorSpec(
        "lines",
        lines,
        ("weight", "density"),
        {"alpha": 1.0, "beta": 0.0, **_WRAP},
        group_params=("alpha", "beta"),
        context=frozenset({"layer"}),
        description="base merge with the task vector scaled linearly with depth",
    ),
    OperatorSpec(
        "consensus",
        consensus,
        ("weight", "density"),
        {"k": 2, "mask_lambda": 0.4, **_WRAP},
        group_params=("k",),
        description="base merge kept where >= k TALL masks agree",
    ),
    OperatorSpec(
        "pcb",
        pcb,
        ("weight", "density"),
        {"lambda": 1.0, "outlier": 1e-4},
        context=frozenset({"whole"}),
        description="parameter competition balancing",
    ),
    OperatorSpec(
        "widen",
        widen,
        ("weight",),
        {"above_average_ratio": 1.0, "calibration": 1.0},
        context=frozenset({"whole", "layer", "name"}),
        description="weight disentanglement merge",
    ),
    OperatorSpec(
        "tsv_m",
        tsv_m,
        ("weight",),
        {"fraction": None, "alpha": 1.0},
        context=frozenset({"whole"}),
        description="task singular vectors, orthogonalised",
    ),
    OperatorSpec(
        "passthrough",
        passthrough,
        (),
        {"source": 0, "scale": 1.0},
        group_params=("source", "scale"),
        context=frozenset({"source_tensor"}),
        mergekit_method="passthrough",
        description="one model's tensors as they are",
    ),
    OperatorSpec(
        "fisher",
        fisher,
        ("weight",),
        {"fisher_floor": 1e-12},
        context=frozenset({"fisher"}),
        description="Fisher-weighted average (needs Materializer.compute_fisher)",
    ),
):
    register(_spec)
del _spec

#: mergekit method names accepted as aliases of evomerge operators.
ALIASES: dict[str, str] = {"dare_linear": "dare", "model_soup": "linear", "tsv": "tsv_m", "fisher_merging": "fisher"}


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
