"""Counter-based uniform draws for the random drops (DARE, DELLA).

Sources draw in pairs: entry ``i`` of tensor ``name`` under recipe seed ``seed`` hashes
``x = H(key + (i mod 2^30))`` with ``key = noise_key(seed, name, k // 2, i >> 30)``, where ``H`` is a
32-bit integer hash (the "lowbias32" xor-shift-multiply finaliser); source ``k`` takes the low 16 bits
of ``x`` when ``k`` is even and the high 16 bits when it is odd, so ``u`` is a float32 in ``[0, 1)`` on a
grid of 2^-16 (a keep probability is resolved to 1/65536).

Why a hash and not a generator: a draw is a pure function of its position, so it does not depend on
the order tensors are visited, on the chunking, on the device or on which process merges; it costs no
memory; and a fused kernel computes it in registers with a handful of integer operations (a table of
pre-drawn uniforms at hashed offsets, the earlier scheme, cost a gather per entry: ten times the whole
merge; one hash per pair of sources instead of per source saves another quarter of DARE-TIES). All
arithmetic is int32 with wrap-around, identical in eager torch, in compiled CPU code and in Triton, so
the eager operators and the fused kernels draw bit-identical masks.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from evomerge.merge._torch import torch

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "SEGMENT",
    "keep_threshold",
    "noise_key",
    "noise_keys",
    "pair_hash",
    "source_bits",
    "source_uniform",
    "tensor_generator",
    "tensor_seed",
    "uniforms",
]

SEGMENT = 1 << 30  # int32 positions: tensors past 2^30 entries take one key per segment
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # as a signed int32
_SCALE = 1.0 / (1 << 16)
_BLOCK = 1 << 18


def noise_key(seed: int, name: str, pair: int, segment: int = 0) -> int:
    """The signed int32 key of source pair ``pair`` (sources ``2 pair`` and ``2 pair + 1``) in segment
    ``segment`` of tensor ``name``."""
    h = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(pair)}\x00{int(segment)}".encode()).digest()
    v = int.from_bytes(h[:4], "little")
    return v - (1 << 32) if v >= 1 << 31 else v


def noise_keys(seed: int, name: str, k: int, segment: int = 0, device: str | torch.device = "cpu") -> Tensor:
    """The keys (int32) of ``k`` sources' draws, one per pair, for one segment of tensor ``name``."""
    return torch.tensor(
        [noise_key(seed, name, j, segment) for j in range((k + 1) // 2)], dtype=torch.int32, device=device
    )


def pair_hash(pos: Tensor, key: Tensor | int) -> Tensor:
    """``H(key + pos)`` (int32) for int32 positions ``pos`` within a segment.

    Written with torch operators only, so the same function runs eagerly and inside compiled kernels
    (where the two sources of a pair share it: the compiler computes it once). Right shifts of int32
    are arithmetic, hence the masks (a logical shift is what the hash needs).
    """
    x = pos + key
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def source_bits(pos: Tensor, keys: Tensor, k: int) -> Tensor:
    """Source ``k``'s 16 draw bits (int32 in [0, 2^16)) at int32 positions ``pos`` of a segment: its
    uniform is ``bits / 2^16``."""
    x = pair_hash(pos, keys[k // 2])
    if k % 2:
        x = x >> 16
    return x & 0xFFFF


def source_uniform(pos: Tensor, keys: Tensor, k: int) -> Tensor:
    """Source ``k``'s uniforms (float32 in [0, 1)) at int32 positions ``pos`` of a segment."""
    return source_bits(pos, keys, k).to(torch.float32) * _SCALE


def keep_threshold(p: Tensor) -> Tensor:
    """Integer thresholds (int32) with ``bits < keep_threshold(p)`` exactly when ``bits / 2^16 < p``.

    ``bits / 2^16`` is exact in float32 and so is ``p * 2^16`` (a power-of-two scale), so the float
    comparison ``u < p`` holds exactly when the integer ``bits`` is below ``ceil(p * 2^16)``. Fused
    CPU kernels compare in integers because compiled int-to-float conversion of the draws is a scalar
    loop there (it made DARE-TIES twice as slow as the rest of the kernel).
    """
    q = torch.nan_to_num(p.to(torch.float32), nan=0.0) * (1 << 16)
    return torch.ceil(q).clamp(0, 1 << 16).to(torch.int32)


def uniforms(
    seed: int,
    name: str,
    k: int,
    start: int,
    stop: int,
    *,
    device: str | torch.device = "cpu",
    out: Tensor | None = None,
) -> Tensor:
    """The ``K x (stop - start)`` draws (float32) of entries ``[start, stop)`` of tensor ``name``."""
    if out is None:
        out = torch.empty((k, stop - start), dtype=torch.float32, device=device)
    # a cache-sized block at a time on the CPU: the hash's int32 temporaries stay in cache
    block = _BLOCK if out.device.type == "cpu" else SEGMENT
    s = start
    while s < stop:
        seg = s // SEGMENT
        e = min(stop, (seg + 1) * SEGMENT, s + block)
        pos = torch.arange(s - seg * SEGMENT, e - seg * SEGMENT, dtype=torch.int32, device=out.device)
        for j in range((k + 1) // 2):
            x = pair_hash(pos, noise_key(seed, name, j, seg))
            out[2 * j, s - start : e - start] = (x & 0xFFFF).to(torch.float32) * _SCALE
            if 2 * j + 1 < k:
                out[2 * j + 1, s - start : e - start] = ((x >> 16) & 0xFFFF).to(torch.float32) * _SCALE
        s = e
    return out


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for tensor ``name`` under recipe seed ``seed`` (order- and device-independent)."""
    h = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for tensor ``name`` under recipe seed ``seed``; see :func:`tensor_seed`."""
    return torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
