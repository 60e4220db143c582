"""Fused CPU/GPU kernels for the hot merge operators (``torch.compile``).

Each kernel reads the base chunk and the K task-vector chunks once, in their stored dtype, does the
whole operator in registers (mask, weights, sign election, disjoint sum, division) and writes the
result straight into the target tensor, so a candidate costs about one pass over the resident data:
the memory-bandwidth floor. The eager operators in :mod:`evomerge.merge.operators` remain the
reference; the kernels follow them up to float32 summation order (a sign election can flip where the
weighted sum is within round-off of 0).

Kernels compile once per process per (operator variant, K, dtypes) with dynamic sizes (about 5-30 s
on a CPU; inductor's on-disk cache makes later processes faster). :func:`available` says whether
compilation works here; when it does not, the materializer uses the eager operators.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "for_operator", "FUSED_OPERATORS"]

FUSED_OPERATORS = ("linear", "task_arithmetic", "ties", "dare", "dare_ties")
NOISE_BLOCK = 1 << 16  # = evomerge.merge.materialize.NOISE_BLOCK


def _ta_body(out: Tensor, b: Tensor, d: Tensor, coef: Tensor, bscale: Tensor) -> None:
    acc = b.float() * bscale
    for k in range(d.shape[0]):
        acc = acc + d[k].float() * coef[k]
    out.copy_(acc)


def _uniform(table: Tensor, offs: Tensor, k: int, n: int) -> Tensor:
    """Source k's draws for a whole tensor: block ``i // NOISE_BLOCK`` reads the seed's table from its
    offset (the materializer's layout, see :mod:`evomerge.merge.materialize`), gathered in-kernel."""
    idx = torch.arange(n, device=table.device)
    blk = idx // NOISE_BLOCK
    return table[offs[k][blk] + (idx - blk * NOISE_BLOCK)]


def _dare_body(out: Tensor, b: Tensor, d: Tensor, table: Tensor, offs: Tensor, dens: Tensor, coef: Tensor) -> None:
    acc = b.float()
    n = b.shape[0]
    for k in range(d.shape[0]):
        keep = _uniform(table, offs, k, n) < dens[k]
        acc = acc + torch.where(keep, d[k].float() * coef[k], 0.0)
    out.copy_(acc)


def _ties_tail(out: Tensor, b: Tensor, wd: list[Tensor], w: Tensor, lam: Tensor, normalize: bool) -> None:
    s = wd[0]
    for x in wd[1:]:
        s = s + x
    el = torch.where(s >= 0, 1.0, -1.0)
    num = torch.zeros_like(s)  # sum of |agreeing entries|: x agrees when x * el > 0
    div = torch.zeros_like(s)
    for k, x in enumerate(wd):
        xe = x * el
        num = num + torch.clamp_min(xe, 0.0)
        if normalize:
            div = div + torch.where(xe > 0, w[k], 0.0)
    num = num * el
    if normalize:
        num = num / torch.where(div == 0, 1.0, div)
    out.copy_(b.float() + num * lam)


def _ties_body(out: Tensor, b: Tensor, d: Tensor, thr: Tensor, w: Tensor, lam: Tensor, normalize: bool) -> None:
    wd = []
    for k in range(d.shape[0]):
        x = d[k].float()
        wd.append(torch.where(x.abs() >= thr[k], x * w[k], 0.0))
    _ties_tail(out, b, wd, w, lam, normalize)


def _dare_ties_body(
    out: Tensor,
    b: Tensor,
    d: Tensor,
    table: Tensor,
    offs: Tensor,
    dens: Tensor,
    coef: Tensor,
    w: Tensor,
    lam: Tensor,
    normalize: bool,
) -> None:
    wd = []
    n = b.shape[0]
    for k in range(d.shape[0]):
        wd.append(torch.where(_uniform(table, offs, k, n) < dens[k], d[k].float() * coef[k], 0.0))
    _ties_tail(out, b, wd, w, lam, normalize)


@functools.cache
def _compiled(name: str) -> Callable[..., None]:
    body = {"ta": _ta_body, "dare": _dare_body, "ties": _ties_body, "dare_ties": _dare_ties_body}[name]
    return torch.compile(body, dynamic=True, fullgraph=True)


@functools.cache
def available() -> bool:
    """Whether ``torch.compile`` works here (a C++ compiler for CPU inductor); checked once."""
    try:
        out = torch.empty(8)
        _compiled("ta")(out, torch.zeros(8), torch.ones(2, 8), torch.ones(2), torch.ones(()))
        return bool(torch.allclose(out, torch.full((8,), 2.0)))
    except Exception:  # noqa: BLE001 - no compiler, unsupported platform: fall back to eager
        return False


def for_operator(name: str, params: dict[str, Any], device: torch.device) -> Callable[..., Tensor] | None:
    """A fused kernel ``kern(out, base, deltas, weights, densities, extra) -> out`` for the operator with
    these params, or ``None`` when there is none (other operators, DARE's L1 rescale). Kernels take
    whole flat tensors; random ones read ``extra["noise_table"]`` / ``extra["noise_offsets"]``."""
    if name not in FUSED_OPERATORS or not available():
        return None
    lam = float(params.get("lambda", 1.0))
    normalize = bool(params.get("normalize", False))
    if name in ("dare", "dare_ties"):
        r = params.get("rescale")
        if r is True or r == "l1":
            return None
        inverse = r in ("inverse", "1/density", "inv")

    def coef_of(w: Tensor, dens: Tensor) -> Tensor:
        if name in ("dare", "dare_ties") and inverse and bool((dens < 1).any()):
            return torch.where(dens > 0, w / dens.clamp(1e-12, 1.0), torch.zeros_like(w))
        return w

    if name == "linear":

        def kern(out, b, d, w, dens, extra):
            s = float(w.sum())
            if normalize:
                div = s if abs(s) >= 1e-8 else 1.0
                _compiled("ta")(out, b, d, w / div, torch.ones((), device=w.device))
            else:
                _compiled("ta")(out, b, d, w, torch.full((), s, device=w.device))
            return out

    elif name == "task_arithmetic":

        def kern(out, b, d, w, dens, extra):
            s = float(w.sum())
            div = s if normalize and abs(s) >= 1e-8 else 1.0
            _compiled("ta")(out, b, d, w * (lam / div), torch.ones((), device=w.device))
            return out

    elif name == "ties":

        def kern(out, b, d, w, dens, extra):
            thr = extra["thresholds"].to(w.device, torch.float32)
            _compiled("ties")(out, b, d, thr, w, torch.full((), lam, device=w.device), normalize)
            return out

    elif name == "dare":

        def kern(out, b, d, w, dens, extra):
            c = coef_of(w, dens)
            s = float(c.sum())
            div = s if normalize and abs(s) >= 1e-8 else 1.0
            if "noise_table" not in extra:  # nothing dropped
                _compiled("ta")(out, b, d, w * (lam / div), torch.ones((), device=w.device))
            else:
                _compiled("dare")(out, b, d, extra["noise_table"], extra["noise_offsets"], dens, c * (lam / div))
            return out

    else:  # dare_ties

        def kern(out, b, d, w, dens, extra):
            lt = torch.full((), lam, device=w.device)
            if "noise_table" not in extra:
                thr = torch.full_like(w, -float("inf"))
                _compiled("ties")(out, b, d, thr, w, lt, normalize)
            else:
                t, o = extra["noise_table"], extra["noise_offsets"]
                _compiled("dare_ties")(out, b, d, t, o, dens, coef_of(w, dens), w, lt, normalize)
            return out

    return kern
