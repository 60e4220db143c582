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

DELLA on the CPU runs the C kernel of :mod:`evomerge.merge.native` where it builds: inductor's code
for its histogram lookup is scalar, the C compiler's a vector gather (bit-identical, 1.6x faster).
On the CPU the materializer's ``apply`` runs the others as C too, the whole model in one call
(:func:`plan` gives both paths their arguments, and the two are bit-identical); these compiled
kernels then serve the rest: one tensor at a time (``merged_state_dict``, ``evomerge merge``) and
the GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from evomerge.merge import native
from evomerge.merge.draws import source_bits, source_uniform
from evomerge.merge.operators import OPERATORS, Plan, get_operator

__all__ = ["available", "for_operator", "fused_operators", "plan", "Plan"]


def _ta_body(out: Tensor, b: Tensor, d: Tensor, coef: Tensor, bscale: Tensor) -> None:
    acc = b.float() * bscale
    for k in range(d.shape[0]):
        acc = acc + d[k].float() * coef[k]
    out.copy_(acc)


def _bits(keys: Tensor, k: int, n: int) -> Tensor:
    """Source k's draw bits (int32) for a segment of a tensor, hashed from positions in registers (see
    :mod:`evomerge.merge.draws`: the same function the eager path calls), compared with
    :func:`keep_threshold`."""
    return source_bits(torch.arange(n, dtype=torch.int32, device=keys.device), keys, k)


def _dare_body(out: Tensor, b: Tensor, d: Tensor, keys: Tensor, below: Tensor, coef: Tensor) -> None:
    acc = b.float()
    n = b.shape[0]
    for k in range(d.shape[0]):
        keep = _bits(keys, k, n) < below[k]
        acc = acc + torch.where(keep, d[k].float() * coef[k], 0.0)
    out.copy_(acc)


def _ties_tail(out: Tensor, b: Tensor, wd: list[Tensor], w: Tensor, lam: Tensor, normalize: bool) -> None:
    out.copy_(_ties_value(b.float(), wd, w, lam, normalize))


def _ties_value(bf: Tensor, wd: list[Tensor], w: Tensor, lam: Tensor, normalize: bool) -> Tensor:
    """``base + lam * (TIES merge of the trimmed, weighted task vectors wd)`` in float32."""
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
    return bf + num * lam


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
    keys: Tensor,
    below: Tensor,
    coef: Tensor,
    w: Tensor,
    lam: Tensor,
    normalize: bool,
) -> None:
    wd = []
    n = b.shape[0]
    for k in range(d.shape[0]):
        wd.append(torch.where(_bits(keys, k, n) < below[k], d[k].float() * coef[k], 0.0))
    _ties_tail(out, b, wd, w, lam, normalize)


def _della_value(
    bf: Tensor,
    xs: list[Tensor],
    pos: Tensor,
    keys: Tensor,
    cdf: Tensor,
    scale: Tensor,
    dens: Tensor,
    eps: Tensor,
    two_eps: Tensor,
    coef: Tensor,
    w: Tensor,
    lam: Tensor,
    normalize: bool,
    ties: bool,
    inverse: bool,
) -> Tensor:
    """DELLA of float32 base ``bf`` and task vectors ``xs`` at segment positions ``pos``, in float32.

    MagPrune in registers: |tau|'s rank from the source's cumulative histogram (a K x BINS table
    that stays in L1), the keep probability, the draw, the 1/p rescale; then TIES or a plain sum.
    """
    bins = cdf.shape[1]
    wd = []
    for k, x in enumerate(xs):
        # clamped before the cast, so the index is in range by construction: no bounds check per entry;
        # by comparisons, not clamp, which keeps a NaN (its cast would index far outside the table)
        q = x.abs() * scale[k]
        q = torch.where(q >= 0, q, 0.0)
        q = torch.where(q <= bins - 1, q, float(bins - 1))
        r = torch.ops.aten._unsafe_index(cdf[k], [q.to(torch.int32)])
        p = (dens[k] - eps + two_eps * r).clamp(0.0, 1.0)
        p = torch.where(dens[k] <= 0, 0.0, p)
        p = torch.where(dens[k] >= 1, 1.0, p)
        keep = source_uniform(pos, keys, k) < p
        v = x / p if inverse else x
        wd.append(torch.where(keep, v * coef[k], 0.0))
    if ties:
        return _ties_value(bf, wd, w, lam, normalize)
    s = wd[0]
    for x in wd[1:]:
        s = s + x
    return bf + s * lam


def _della_body(out: Tensor, b: Tensor, d: Tensor, keys: Tensor, *args: Any) -> None:
    pos = torch.arange(b.shape[0], dtype=torch.int32, device=b.device)
    out.copy_(_della_value(b.float(), [d[k].float() for k in range(d.shape[0])], pos, keys, *args))


def _bf16_low(v: Tensor) -> Tensor:
    """The bfloat16 in the low half of each int32 of ``v``, as float32 (a bit shift: exact)."""
    return (v << 16).view(torch.float32)


def _bf16_high(v: Tensor) -> Tensor:
    """The bfloat16 in the high half of each int32 of ``v``, as float32."""
    return (v & -65536).view(torch.float32)


def _to_bf16_bits(f: Tensor) -> Tensor:
    """float32 to bfloat16 bits (int32 in [0, 2^16)) as torch rounds: to nearest even (infinities and
    overflow included); a NaN becomes the quiet NaN 0x7FC0 (rounding its payload could carry into
    the sign bit)."""
    u = f.view(torch.int32)
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF
    return torch.where(f != f, 0x7FC0, r)


def _della_pairs_body(out: Tensor, b: Tensor, d: Tensor, keys: Tensor, *args: Any) -> None:
    """:func:`_della_body` on bfloat16 data viewed as int32 pairs (entries 2j and 2j + 1 in one int32).

    Why: inductor tiles a loop that loads bfloat16 at 32 lanes, and for two-register vectors its
    int32/float32 conversions (the histogram index, the draws) are scalar loops, most of DELLA's
    cost on the CPU. On int32 pairs every value is one 16-lane register, the conversions vectorise
    and the bfloat16 widening is a shift: 1.7x faster (measured, 16M entries), bit-identical.
    """
    j = torch.arange(b.shape[0], dtype=torch.int32, device=b.device)
    halves = []
    for half, widen in ((0, _bf16_low), (1, _bf16_high)):
        xs = [widen(d[k]) for k in range(d.shape[0])]
        halves.append(_to_bf16_bits(_della_value(widen(b), xs, 2 * j + half, keys, *args)))
    out.copy_(halves[0] | (halves[1] << 16))


@functools.cache
def _compiled(name: str) -> Callable[..., None]:
    body = {
        "ta": _ta_body,
        "dare": _dare_body,
        "ties": _ties_body,
        "dare_ties": _dare_ties_body,
        "della": _della_body,
        "della_pairs": _della_pairs_body,
    }[name]
    # each (dtype, number of sources, flag combination) is its own graph; a process that meets more
    # than dynamo's default 8 (a test run, a worker serving several studies) must not fail on the 9th
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(body, dynamic=True, fullgraph=True)


def available(device: str | torch.device = "cpu") -> bool:
    """Whether ``torch.compile`` works here for ``device`` (a C++ compiler for CPU inductor, Triton
    for CUDA); checked once per device type."""
    return _available(torch.device(device).type)


@functools.cache
def _available(device_type: str) -> bool:
    try:
        out = torch.empty(8, device=device_type)
        ones = torch.ones(2, 8, device=device_type)
        _compiled("ta")(out, torch.zeros(8, device=device_type), ones, torch.ones(2, device=device_type),
                        torch.ones((), device=device_type))  # fmt: skip
        return bool(torch.allclose(out.cpu(), torch.full((8,), 2.0)))
    except Exception:  # noqa: BLE001 - no compiler, unsupported platform: fall back to eager
        return False


def _call(kernel: str, out: Tensor, b: Tensor, d: Tensor, *args: Any) -> None:
    """Run a compiled kernel; its small tensor arguments (weights, densities, thresholds: built on the
    host, where the genes are) go to the data's device without a synchronisation."""
    dev = b.device
    moved = [a.to(dev, non_blocking=True) if isinstance(a, Tensor) and a.device != dev else a for a in args]
    _compiled(kernel)(out, b, d, *moved)


def _pairs_ok(out: Tensor, b: Tensor, d: Tensor) -> bool:
    """Whether bfloat16 CPU data can be read as int32 pairs (see :func:`_della_pairs_body`)."""
    ts = (out, b, d)
    return (
        b.device.type == "cpu"
        and all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 and t.storage_offset() % 2 == 0 for t in ts)
        and b.shape[-1] % 2 == 0
        and d.stride(0) % 2 == 0
        and all(t.data_ptr() % 4 == 0 for t in ts)
    )


def linear_kernel(
    device: str | torch.device = "cpu",
) -> Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor] | None:
    """``kern(out, base, deltas, coefs, bscale) -> out`` writing ``bscale * base + sum_i coefs_i * deltas_i``
    (operators with a linear form: SLERP, Model Stock), or ``None`` when compilation does not work here."""
    if not available(device):
        return None

    def kern(out, b, d, coef, bscale):
        _call("ta", out, b, d, coef, torch.full((), float(bscale)))
        return out

    return kern


def fused_operators() -> tuple[str, ...]:
    """The operators whose spec declares a fused kernel."""
    return tuple(name for name, spec in OPERATORS.items() if spec.fused is not None)


def plan(name: str, params: dict[str, Any], w: Tensor, dens: Tensor, drawn: bool) -> Plan | None:
    """The kernel and its arguments for operator ``name`` with ``params`` and one group's host (CPU)
    weights and densities, ``drawn`` when the operator drops entries at random (a density below 1);
    ``None`` when no fused kernel applies (operators without one, the L1 rescale of DARE and DELLA).
    The operator's spec says which (its ``fused``)."""
    fused = get_operator(name).fused
    return None if fused is None else fused(params, w, dens, drawn)


def for_operator(name: str, params: dict[str, Any], device: torch.device) -> Callable[..., Tensor] | None:
    """A fused kernel ``kern(out, base, deltas, weights, densities, extra) -> out`` for the operator with
    these params, or ``None`` when there is none (other operators, DARE's L1 rescale). Weights,
    densities and thresholds come as host (CPU) tensors, the rest on the data's device. Kernels take
    whole flat tensors; random ones read ``extra["noise_keys"]`` (one segment of a tensor per call)."""
    probe = torch.ones(1)
    if plan(name, params, probe, probe, False) is None or not available(device):
        return None
    eps = float(params.get("epsilon", 0.15))

    def kern(out, b, d, w, dens, extra):
        p = plan(name, params, w, dens, "noise_keys" in extra)
        lam = torch.full((), p.lam)
        if p.kernel == "ta":
            _call("ta", out, b, d, p.coef, torch.full((), p.bscale))
        elif p.kernel == "ties":
            thr = extra["thresholds"].to(torch.float32) if p.trim else torch.full_like(w, -float("inf"))
            _call("ties", out, b, d, thr, p.w, lam, p.normalize)
        elif p.kernel == "dare":
            _call("dare", out, b, d, extra["noise_keys"], p.below, p.coef)
        elif p.kernel == "dare_ties":
            _call("dare_ties", out, b, d, extra["noise_keys"], p.below, p.coef, p.w, lam, p.normalize)
        else:
            _della(out, b, d, p, dens, eps, extra)
        return out

    return kern


def native_della(name: str, params: dict[str, Any], dtype: torch.dtype, k: int) -> Callable[..., Tensor] | None:
    """DELLA's C kernel alone, with the signature of :func:`for_operator`'s kernels, for a materializer
    that runs the C kernels without ``torch.compile`` (``native``): ``None`` for other operators, the
    L1 rescale, or where the C kernel does not take these tensors (then the operator runs eager).
    It serves the tensors of groups where DELLA draws; the others go through the segment table."""
    probe = torch.ones(1)
    drawn = plan(name, params, probe, probe * 0.5, True)
    if (
        drawn is None
        or drawn.kernel != "della"
        or dtype not in (torch.bfloat16, torch.float32)
        or not 1 <= k <= 16
        or not native.available()
    ):
        return None
    eps = float(params.get("epsilon", 0.15))

    def kern(out, b, d, w, dens, extra):
        if "noise_keys" not in extra:  # the materializer sends only groups that draw here
            raise RuntimeError("native DELLA kernel called without draws")
        p = plan(name, params, w, dens, True)
        keys, cdf, scale = extra["noise_keys"], extra["della_cdf"], extra["della_scale"]
        if not native.della(out, b, d, keys, cdf, scale, dens, eps, p.coef, p.w, p.lam, p.normalize, p.elect,
                            p.inverse):  # fmt: skip
            raise RuntimeError("native DELLA kernel refused tensors it was chosen for")
        return out

    return kern


def _della(out: Tensor, b: Tensor, d: Tensor, p: Plan, dens: Tensor, eps: float, extra: dict[str, Any]) -> None:
    """DELLA with draws: the C kernel where it runs, else the compiled one (on int32 pairs for bfloat16)."""
    keys, cdf, scale = extra["noise_keys"], extra["della_cdf"], extra["della_scale"]
    if native.della(out, b, d, keys, cdf, scale, dens, eps, p.coef, p.w, p.lam, p.normalize, p.elect, p.inverse):
        return
    name_, out_, b_, d_ = "della", out, b, d
    if _pairs_ok(out, b, d):
        name_, out_, b_, d_ = "della_pairs", out.view(torch.int32), b.view(torch.int32), d.view(torch.int32)
    _call(
        name_, out_, b_, d_, keys, cdf, scale, dens,
        torch.full((), eps, dtype=torch.float32),
        torch.full((), 2.0 * eps, dtype=torch.float32),
        p.coef, p.w, torch.full((), p.lam), p.normalize, p.elect, p.inverse,
    )  # fmt: skip
