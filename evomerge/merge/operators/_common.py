"""Tensor helpers the operators share: dtypes, stacking, masks, the TIES and task-arithmetic combines,
and the sparsifications whose inputs the materializer precomputes (magnitude trims, breadcrumbs bands,
DARE and DELLA draws)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from evomerge.merge._torch import torch

if TYPE_CHECKING:
    from torch import Tensor


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _stack(deltas: Sequence[Tensor] | Tensor, base: Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(deltas, torch.Tensor):
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
