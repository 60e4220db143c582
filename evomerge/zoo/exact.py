"""Matrix products whose float result does not depend on the BLAS, the CPU or the thread count.

A float sum's rounding depends on the order of its terms, and every BLAS picks that order by the CPU it
runs on: MKL ignores its reproducibility pin on AMD processors, so the same zoo recipe trained into other
weights there (docs/benchmarks.md). Here each operand is rounded to integers on a power-of-two grid per row
(left) or column (right) -- block floating point with ``p`` bits -- and multiplied in float64, where every
product and every partial sum of at most ``k`` of them is an integer below 2**53, so exact in any order.
The float32 result is that exact value rounded once. With ``k`` up to 2048 terms ``p`` is 21 bits (a float32
carries 24), so training loses next to nothing; the product costs about 3x a float32 one on the zoo's sizes.

The remaining numerics of a training step are torch's own elementwise and reduction kernels: one code path
(:mod:`evomerge.zoo.numerics` pins AVX2 and one thread), the same instructions on every such CPU.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten
_MM = {aten.mm.default, aten.bmm.default}
_ADDMM = {aten.addmm.default, aten.baddbmm.default}
# Products this module does not compute: met inside the mode, they fail loudly rather than train with the
# BLAS's order (attention must run in eager mode, not through a fused kernel).
# (``linear``, ``matmul``, ``einsum`` decompose into ``mm``/``bmm`` before a dispatch mode sees them.)
_OTHER = {f"aten::{n}" for n in ("mv", "dot", "vdot", "addmv", "addr", "addbmm", "_int_mm", "convolution",
                                  "_convolution")}
_OTHER_PREFIXES = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::mkldnn", "aten::_mkldnn")


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as float32, exact, for integer ``k`` in [-126, 127] (built from the exponent bits)."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def _grid(x: torch.Tensor, dim: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ~ q * s``: integers ``|q| <= 2**p`` (float64) and a power-of-two scale ``s`` per slice along ``dim``."""
    _, e = torch.frexp(x.abs().amax(dim=dim, keepdim=True))
    e = e.clamp(-100, 100)  # all-zero or subnormal slices: any scale will do
    return torch.round(x * _pow2(p - e)).double(), _pow2(e - p).double()


def bits_for(k: int) -> int:
    """The grid's bits for sums of ``k`` products: ``k * 4**p <= 2**53``."""
    return (53 - max(1, math.ceil(math.log2(max(k, 2))))) // 2


def exact_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D or batched 3-D float32), the same bits whatever the order the BLAS sums in."""
    p = bits_for(a.shape[-1])
    qa, sa = _grid(a, -1, p)
    qb, sb = _grid(b, -2, p)
    return torch.matmul(qa, qb).mul_(sa).mul_(sb).to(a.dtype)


class ExactMatmul(TorchDispatchMode):
    """Within it, every matrix product torch runs -- forward and backward -- is :func:`exact_mm`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MM or func in _ADDMM:
            dtype = args[-1].dtype
            if not dtype.is_floating_point:  # integer products are exact already
                return func(*args, **kwargs)
            if dtype != torch.float32:
                raise RuntimeError(f"exact numerics: {func.name()} in {dtype} (the grid is for float32 training)")
        if func in _MM:
            with _disable_current_modes():
                return exact_mm(*args)
        if func in _ADDMM:
            inp, a, b = args
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            with _disable_current_modes():
                r = exact_mm(a, b)
                r = r if alpha == 1 else r * alpha
                return r if beta == 0 else (inp + r if beta == 1 else inp * beta + r)
        name = func.name()
        if name in _OTHER or name.startswith(_OTHER_PREFIXES):
            raise RuntimeError(f"exact numerics: {name} has no exact form here (a fused or unhandled product)")
        return func(*args, **kwargs)
