"""Hand-written C kernels, for what ``torch.compile`` cannot make fast.

- ``native_della.c``: DELLA's histogram lookup. Inductor turns the per-entry lookup of |tau|'s rank
  into sixteen scalar loads through a stack buffer; the C compiler makes it a vector gather (1.6x
  faster on the benchmark's 134M-parameter model, measured on an AVX-512 EPYC, 2 threads).
- ``native_merge.c``: task arithmetic (and every operator with a linear form), TIES, DARE and
  DARE-TIES over a table of tensors, the whole model in one call. A compiled kernel called per
  tensor costs ~50 us of dispatch per call, and the materializer's per-tensor Python as much again:
  20-30 ms of a 55 ms floor on the benchmark's model.

Both are bit-identical to the compiled kernels of :mod:`evomerge.merge.kernels` (the tests check the
bits). The sources are compiled once per machine with the system C compiler (the one inductor needs
anyway), ``-O3 -march=native``, into ``$EVOMERGE_CACHE_DIR/native`` (default
``~/.cache/evomerge/native``), under a name that hashes the sources, the compiler and the CPU's
feature flags, so a cache shared between different machines never hands one another's binary.
Without a compiler, or when the build fails, the kernels are unavailable and the materializer uses
the compiled (or eager) ones.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from evomerge.cache import cache_root

__all__ = ["KERNEL_OPS", "SEGMENT", "available", "della", "merge_segments"]

_SOURCES = [Path(__file__).with_name(f) for f in ("native_della.c", "native_merge.c")]
_HEADERS = [Path(__file__).with_name("native_common.h")]  # part of the cache key, not compiled alone
# No fused multiply-add: the kernels must round exactly as the compiled (and the eager) ones do.
# -fno-trapping-math: lets the vectoriser turn ``cond ? v * w : 0`` into a select (nothing here
# reads floating-point exception flags).
# -fopenmp: the library then needs libgomp.so.1, the one torch has loaded already, so the kernel runs
# on torch's OpenMP threads, warm and spinning (Python threads took ~0.3 ms to wake on a 2-vCPU VM,
# which made two threads slower than one on 1.5M-entry tensors).
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=c99",
          "-fopenmp", "-fPIC", "-shared"]  # fmt: skip
_MIN_PER_THREAD = 1 << 15  # entries: below this a parallel region costs more than it saves


KMAX = 8  # sources a merge_segments call takes (native_merge.c's KMAX)
OP_LINEAR, OP_TIES, OP_DARE, OP_DARE_TIES = 0, 1, 2, 3
#: the C op code of each fused kernel a Plan names (``della`` runs through :func:`della` instead).
KERNEL_OPS = {"ta": OP_LINEAR, "ties": OP_TIES, "dare": OP_DARE, "dare_ties": OP_DARE_TIES}

# One row per tensor (or per draw segment of a tensor): native_merge.c's seg_t, field for field
# (aligned as the C compiler lays it out; _library checks the size against the C one).
SEGMENT = np.dtype(
    [
        ("b", np.int64), ("d", np.int64), ("out", np.int64),  # addresses
        ("n", np.int64), ("dstride", np.int64), ("pos0", np.int64),
        ("op", np.int32), ("normalize", np.int32), ("lam", np.float32), ("bscale", np.float32),
        ("coef", np.float32, (KMAX,)), ("w", np.float32, (KMAX,)), ("thr", np.float32, (KMAX,)),
        ("below", np.int32, (KMAX,)), ("keys", np.int32, (KMAX // 2,)),
    ],
    align=True,
)  # fmt: skip


def cache_dir() -> Path:
    """``$EVOMERGE_CACHE_DIR/native``, else ``~/.cache/evomerge/native``."""
    return cache_root() / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (Linux), else the platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _build(cc: str) -> Path:
    """The shared library for these sources, compiler and CPU: built once, then taken from the cache."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    srcs = [p.read_bytes() for p in (*_SOURCES, *_HEADERS)]
    tag = hashlib.sha256(b"\0".join([*srcs, cc.encode(), version.encode(), _cpu_identity().encode(),
                                     " ".join(_FLAGS).encode()])).hexdigest()[:16]  # fmt: skip
    out = cache_dir() / f"kernels-{tag}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *_FLAGS, "-o", tmp, *map(str, _SOURCES)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise OSError(f"{cc} failed: {r.stderr.strip()[:500]}")
        os.replace(tmp, out)  # atomic: a concurrent build by another worker loses nothing
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None or not all(p.is_file() for p in (*_SOURCES, *_HEADERS)):
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))  # CDLL, not PyDLL: a call releases the GIL while it runs
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    for fn in (lib.della_bf16, lib.della_f32):
        fn.argtypes = [p, p, i64, i32, i64, i64, p, p, i32, p, p, p, p, f32, p, p, f32, i32, i32, i32, p, i32]
        fn.restype = i32
    lib.merge_segments.argtypes = [p, i64, i32, i32, i32]
    lib.merge_segments.restype = i32
    if lib.seg_size() != SEGMENT.itemsize:  # the two layouts of a segment must agree, or nothing runs
        return None
    return lib


def available() -> bool:
    """Whether the C kernels build and load here (checked once per process)."""
    return _library() is not None


def della(
    out: Tensor,
    b: Tensor,
    d: Tensor,
    keys: Tensor,
    cdf: Tensor,
    scale: Tensor,
    dens: Tensor,
    eps: float,
    coef: Tensor,
    w: Tensor,
    lam: float,
    normalize: bool,
    ties: bool,
    inverse: bool,
) -> bool:
    """DELLA of one draw segment into ``out`` (see ``kernels._della_value`` for the arguments), or
    ``False`` when these tensors do not suit the C kernel (then nothing is written): CPU, bfloat16
    or float32 alike in ``out``, ``b`` and ``d``, contiguous rows, at most 16 sources. Shapes that
    do not fit one another raise: the C code would read or write outside them."""
    lib = _library()
    dt = b.dtype
    k, n = d.shape[0], b.shape[0]
    if (
        lib is None
        or dt not in (torch.bfloat16, torch.float32)
        or not all(t.device.type == "cpu" and t.dtype == dt and t.stride(-1) == 1 for t in (out, b, d))
        or not 1 <= k <= 16
    ):
        return False
    if not (
        b.dim() == out.dim() == 1
        and d.dim() == 2
        and out.shape[0] == d.shape[1] == n
        and cdf.dim() == 2
        and cdf.shape[0] >= k
        and min(scale.numel(), dens.numel(), coef.numel(), w.numel()) >= k
        and keys.numel() >= (k + 1) // 2
    ):
        raise ValueError(f"native DELLA: shapes do not fit ({k} sources, {n} entries)")
    fn = lib.della_bf16 if dt == torch.bfloat16 else lib.della_f32
    f32 = torch.float32
    dens = dens.to(f32)
    cdf = cdf.to(f32).contiguous()
    eps_t = torch.tensor(eps, dtype=f32)
    # per source: a = density - epsilon as the compiled kernel computes it (float32), and the clamp of
    # the keep probability, which also gives p = 0 at density <= 0 and p = 1 at density >= 1
    small = [
        scale.to(f32).contiguous(),
        (dens - eps_t).contiguous(),
        torch.where(dens >= 1, 1.0, 0.0).to(f32),
        torch.where(dens <= 0, 0.0, 1.0).to(f32),
    ]
    coef, w, keys = coef.to(f32).contiguous(), w.to(f32).contiguous(), keys.to(torch.int32).contiguous()
    two_eps = float(torch.tensor(2.0 * eps, dtype=f32))

    nt = max(1, min(torch.get_num_threads(), n // _MIN_PER_THREAD))
    rc = fn(
        b.data_ptr(), d.data_ptr(), d.stride(0), k, 0, n, keys.data_ptr(), cdf.data_ptr(), cdf.shape[1],
        *(t.data_ptr() for t in small), two_eps, coef.data_ptr(), w.data_ptr(), lam,
        int(normalize), int(ties), int(inverse), out.data_ptr(), nt,
    )  # fmt: skip
    if rc:
        raise RuntimeError("native DELLA kernel rejected its arguments")  # checked above: a bug if reached
    return True


def merge_segments(segs: np.ndarray, k: int, dtype: torch.dtype) -> None:
    """Run every row of ``segs`` (a :data:`SEGMENT` array) with ``k`` task vectors of ``dtype``
    (bfloat16 or float32) on torch's threads. The caller guarantees the addresses: each row's base,
    task vector rows and output hold ``n`` contiguous entries of ``dtype``, and they stay alive."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the C kernels are not available here")
    if segs.dtype != SEGMENT or not segs.flags.c_contiguous:
        raise ValueError("segments must be a contiguous SEGMENT array")
    if dtype not in (torch.bfloat16, torch.float32) or not 1 <= k <= KMAX:
        raise ValueError(f"native merge: {k} sources of {dtype} (1 to {KMAX} sources, bfloat16 or float32)")
    work = int(segs["n"].sum()) if len(segs) else 0
    nt = max(1, min(torch.get_num_threads(), work // _MIN_PER_THREAD))
    rc = lib.merge_segments(segs.ctypes.data, len(segs), k, int(dtype == torch.bfloat16), nt)
    if rc:
        raise RuntimeError(f"native merge rejected its segments (code {rc})")
