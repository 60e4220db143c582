"""Resident sources: what the materializer loads once and keeps for every candidate.

A :class:`Resident` reads the base and the source models tensor by tensor (so loading never holds
more than one extra tensor), keeps the base tensors and the stacked task vectors
``tau_t = theta_t - theta0`` on its device, and builds lazily what does not depend on the candidate:

- for magnitude trims (TIES, breadcrumbs), per tensor and source an index of |tau| order statistics,
  so the trim at any density is a lookup of the ``k``-th value (no sort, no top-k per candidate);
- for DELLA, per tensor and source a cumulative histogram of |tau|, so an entry's magnitude rank is a
  table lookup;
- for DARE and DELLA nothing: their draws are a hash of the entry's position (see
  :mod:`evomerge.merge.draws`), computed where they are used;
- the diagonal Fisher of every source (the ``fisher`` operator), and per operator the
  gene-independent statistics of its linear form (SLERP's angle, Model Stock's cosine).

A LoRA adapter source (a PEFT folder, or mergekit's ``model+adapter``) reads as base + B·A·scale.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evomerge.merge import draws as draws_mod
from evomerge.merge.checkpoint import Reader, TensorSource, load_state_dict, tied_alias
from evomerge.merge.fisher import fisher_key, source_fisher
from evomerge.merge.lora import is_lora_adapter, source_state_dict
from evomerge.merge.operators import OperatorSpec, _band, della_ranks, magnitude_thresholds, trim_count
from evomerge.recipe import tensor_slot

__all__ = ["DELLA_BINS", "Resident", "own_mappings", "source_reader"]

DELLA_BINS = 4096

# glibc's mallopt parameter M_MMAP_THRESHOLD; the threshold while building resident tensors, and after
_M_MMAP_THRESHOLD = -3
_MMAP_OWN = 1 << 20
_MMAP_AFTER = 32 << 20  # glibc's own ceiling for its dynamic threshold
_mappings_depth = 0


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs: no mallopt
        return None


@contextlib.contextmanager
def own_mappings() -> Iterator[None]:
    """While building resident tensors, give every allocation of 1 MB or more its own mapping (glibc).

    glibc raises its mmap threshold to the size of each large block freed, up to 32 MB, so after the
    first tensors of a load every tensor-sized temporary (a tensor read from disk, a chunk of
    differences, a sort's copy) comes from the heap, and the resident tensors allocated between them
    fragment it. Measured on the 134M-parameter benchmark: loading and the first candidates left 2
    model sizes of freed memory the process never gave back (peak RSS 7.5 model sizes, 5.7 with this).
    Outside these sections the threshold is glibc's 32 MB ceiling: a 1 MB threshold for good makes
    every activation of a CPU forward pass a fresh mapping (25% slower, measured). No-op off glibc.
    """
    global _mappings_depth
    mallopt = _mallopt()
    if mallopt is not None and _mappings_depth == 0:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_OWN)
    _mappings_depth += 1
    try:
        yield
    finally:
        _mappings_depth -= 1
        if mallopt is not None and _mappings_depth == 0:
            mallopt(_M_MMAP_THRESHOLD, _MMAP_AFTER)


def source_reader(path: str | Path, base_path: str | Path) -> TensorSource:
    """A source's tensors; a PEFT LoRA adapter (or mergekit's ``model+adapter``) reads as base + B·A·scale."""
    if is_lora_adapter(path) or ("+" in str(path) and not Path(path).exists()):
        return Reader.from_dict(source_state_dict(path, load_state_dict(base_path)), path)
    return Reader(path)


def _sorted_abs(x: Tensor) -> Tensor:
    """|x| flattened and sorted in ascending order, in x's dtype.

    On the CPU the sort is numpy's, in place on the integer view of |x| (non-negative IEEE floats order
    as their bit patterns; 16-bit ones radix-sort in linear time), so the only temporary is |x| itself:
    ``torch.sort`` would also allocate int64 indices, four times a bf16 tensor, which set the
    materializer's peak memory.
    """
    a = x.reshape(-1).abs()
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}.get(a.dtype)
    if a.device.type != "cpu" or ints is None:
        return torch.sort(a).values
    a.view(ints).numpy().sort(kind="stable" if ints is torch.int16 else "quicksort")
    return a


class Resident:
    """Base tensors, task vectors and their candidate-independent indexes, by checkpoint tensor name.

    ``trim_index`` and ``quantile_points``: see :class:`~evomerge.merge.Materializer`. ``lazy``: load
    nothing now; :meth:`load` / :meth:`drop` hold one tensor at a time.
    """

    def __init__(
        self,
        base_reader: TensorSource,
        readers: list[TensorSource],
        source_paths: list[str],
        *,
        device: torch.device,
        dtype: torch.dtype,
        trim_index: str,
        quantile_points: int,
        lazy: bool,
    ) -> None:
        self.base_reader = base_reader
        self.readers = readers
        self.source_paths = source_paths
        self.device = device
        self.dtype = dtype
        self.trim_index = trim_index
        self.quantile_points = int(quantile_points)
        self.names: list[str] = base_reader.keys()
        self.base: dict[str, Tensor] = {}
        self.deltas: dict[str, Tensor] = {}  # name -> K x shape (float tensors only)
        self.passthrough: set[str] = set()  # non-float tensors, copied from the base as they are
        if not lazy:
            with own_mappings():
                for name in self.names:
                    self.load(name)
        self.slots: dict[str, str | int] = {n: tensor_slot(n) for n in self.names}
        self.position = {n: i for i, n in enumerate(self.names)}
        # name -> (K x P descending |tau| or its quantiles, positions of the quantiles or None)
        self._sorted: dict[str, tuple[Tensor, Tensor | None]] = {}
        self._sorted_views: dict[str, tuple[Tensor, np.ndarray, np.ndarray]] = {}  # numpy views of quantile tables
        self._della: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (K x BINS cdf, K scale)
        self._fisher: dict[str, Tensor] | None = None
        self._fisher_key: str | None = None
        # name -> operator -> gene-independent statistics (OperatorSpec.stats)
        self._stats: dict[str, dict[str, Tensor]] = {}
        self._key_cache: dict[tuple[int, str, int], Tensor] = {}

    @property
    def n_sources(self) -> int:
        return len(self.source_paths)

    def load(self, name: str) -> None:
        """Read tensor ``name`` of the base and of every source; keep the base and the K task vectors."""
        b = self.base_reader.get(name)
        if not b.is_floating_point():
            self.base[name] = b.to(self.device)
            self.passthrough.add(name)
            return
        d = torch.empty((self.n_sources, *b.shape), dtype=self.dtype, device=self.device)
        on_cpu = self.device.type == "cpu"
        bflat = b.reshape(-1) if on_cpu else b.reshape(-1).to(self.device)
        # float32 differences a chunk at a time on the CPU: no tensor-sized temporaries at load
        step = 1 << 20 if on_cpu else max(1, bflat.numel())
        for i, (path, r) in enumerate(zip(self.source_paths, self.readers, strict=True)):
            t = r.get_tied(name)
            if t is None:
                raise KeyError(f"source {path} has no tensor {name!r} (the base has it)")
            if t.shape != b.shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} in {path}, {tuple(b.shape)} in the base")
            tflat, dflat = (t.reshape(-1) if on_cpu else t.reshape(-1).to(self.device)), d[i].view(-1)
            for s in range(0, bflat.numel(), step):
                e = s + step
                dflat[s:e].copy_(tflat[s:e].to(torch.float32) - bflat[s:e].to(torch.float32))
            del t, tflat
        self.base[name] = b.to(device=self.device, dtype=self.dtype)
        self.deltas[name] = d

    def drop(self, name: str) -> None:
        """Forget tensor ``name`` and what was computed from it (lazy mode: one tensor at a time)."""
        for cache in (self.base, self.deltas, self._sorted, self._sorted_views, self._della, self._stats):
            cache.pop(name, None)

    def subset(self, indices: list[int]) -> Resident:
        """Some of the sources, sharing this one's resident tensors (views, no copy); indexes start empty."""
        idx = [int(i) for i in indices]
        sub = copy.copy(self)
        sub.source_paths = [self.source_paths[i] for i in idx]
        sub.readers = [self.readers[i] for i in idx]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            sub.deltas = {n: d[idx[0] : idx[0] + len(idx)] for n, d in self.deltas.items()}
        else:
            sub.deltas = {n: d[idx] for n, d in self.deltas.items()}
        sub._sorted, sub._sorted_views, sub._della, sub._fisher = {}, {}, {}, None
        sub._stats, sub._key_cache = {}, {}
        return sub

    def resident_bytes(self) -> int:
        """Bytes held: base, task vectors, magnitude indexes, DELLA histograms, Fisher."""
        tot = sum(t.numel() * t.element_size() for t in self.base.values())
        tot += sum(t.numel() * t.element_size() for t in self.deltas.values())
        tot += sum(t.numel() * t.element_size() for t, _ in self._sorted.values())
        tot += sum(a.numel() * a.element_size() for a, _ in self._della.values())
        if self._fisher:
            tot += sum(t.numel() * t.element_size() for t in self._fisher.values())
        return tot

    def dev(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True) if t.device != self.device else t

    # ------------------------------------------------------------------------------------------
    # magnitude index (TIES, breadcrumbs)

    def magnitudes(self, name: str) -> tuple[Tensor, Tensor | None]:
        got = self._sorted.get(name)
        if got is not None:
            return got
        with own_mappings():  # the sort's / histogram's temporaries must not fragment the heap
            d = self.deltas[name]
            k = d.shape[0]
            rows, pos = [], None
            n = d[0].numel()
            if self.trim_index == "quantile" and n > self.quantile_points:
                pos = (
                    torch.linspace(0, n - 1, self.quantile_points, dtype=torch.float64).round().long().clamp_(0, n - 1)
                )
            for i in range(k):  # one source at a time: the sort's temporaries stay one tensor large
                asc = _sorted_abs(d[i])
                # descending order: the j-th largest is the (n - 1 - j)-th smallest
                srt = asc.index_select(0, (n - 1 - pos).to(asc.device)) if pos is not None else asc.flip(0)
                del asc
                # quantiles are a few KB: on the host, where thresholds are looked up without a device sync
                rows.append(srt.to(torch.float32).cpu() if pos is not None else srt.to(self.dtype))
                del srt
            got = self._sorted[name] = (torch.stack(rows), pos)
            return got

    def _desc_value(self, name: str, i: int, j: int) -> float:
        """The j-th largest |tau| (0-based) of source i in tensor ``name``, exact or interpolated."""
        table, pos = self.magnitudes(name)
        if pos is None:
            return float(table[i, j])
        # the quantile table and its positions live on the host: numpy views (no copy) look them up
        # in a microsecond, where torch's per-call dispatch made this a third of a TIES candidate's
        # Python time (K lookups per tensor)
        views = self._sorted_views.get(name)
        if views is None or views[0] is not table:  # rebuilt (another trim index): new views
            views = self._sorted_views[name] = (table, table.numpy(), pos.numpy())
        tq, pq = views[1], views[2]
        hi = min(int(pq.searchsorted(j)), len(pq) - 1)
        if int(pq[hi]) == j or hi == 0:
            return float(tq[i, hi])
        lo = hi - 1
        f = (j - int(pq[lo])) / (int(pq[hi]) - int(pq[lo]))
        return float(tq[i, lo]) * (1 - f) + float(tq[i, hi]) * f

    def thresholds(self, name: str, densities: Tensor) -> Tensor:
        """Per source, the magnitude threshold of a top-density trim of tensor ``name``."""
        if self.trim_index == "none":
            return magnitude_thresholds(self.deltas[name], densities)
        return torch.tensor(self.threshold_values(name, densities.tolist()), dtype=torch.float32)

    def threshold_values(self, name: str, densities: list[float]) -> list[float]:
        """:meth:`thresholds` as Python floats (per tensor of every TIES candidate: from the index, no
        torch call per source)."""
        d = self.deltas[name]
        if self.trim_index == "none":
            return magnitude_thresholds(d, torch.tensor(densities, dtype=torch.float32)).tolist()
        n = d[0].numel()
        out = []
        for i, dens in enumerate(densities):
            keep = trim_count(dens, n)
            out.append(-math.inf if keep >= n else math.inf if keep == 0 else self._desc_value(name, i, keep - 1))
        return out

    def band_thresholds(self, name: str, densities: Tensor, gamma: float) -> Tensor:
        """Per source, the ``(lo, hi)`` |tau| band of a breadcrumbs trim of tensor ``name``."""
        d = self.deltas[name]
        k, n = d.shape[0], d[0].numel()
        out = torch.empty(k, 2, dtype=torch.float32)
        for i in range(k):
            if self.trim_index == "none":
                flat = d[i].reshape(-1).abs().float()
                lo, hi = _band(float(densities[i]), gamma, n, lambda j, flat=flat: float(flat.kthvalue(n - j).values))
            else:
                lo, hi = _band(float(densities[i]), gamma, n, lambda j, i=i: self._desc_value(name, i, j))
            out[i, 0], out[i, 1] = lo, hi
        return out

    # ------------------------------------------------------------------------------------------
    # DELLA ranks, random draws

    def della_table(self, name: str) -> tuple[Tensor, Tensor]:
        """``(K x BINS cdf, K scales)`` of tensor ``name``."""
        got = self._della.get(name)
        if got is not None:
            return got
        with own_mappings():  # the sort's / histogram's temporaries must not fragment the heap
            d = self.deltas[name]
            k = d.shape[0]
            n = d[0].numel()
            cdfs, scales = [], []
            for i in range(k):
                flat = d[i].reshape(-1)
                lo, hi = torch.aminmax(flat) if n else (torch.zeros(()), torch.zeros(()))
                vmax = max(abs(float(lo)), abs(float(hi)))
                if n <= DELLA_BINS or vmax == 0.0:
                    cdfs.append(torch.zeros(DELLA_BINS, device=flat.device))
                    scales.append(0.0)
                    continue
                h = torch.zeros(DELLA_BINS, dtype=torch.float64, device=flat.device)
                for s in range(0, n, 1 << 20):  # chunk by chunk: no tensor-sized float32 copy of |tau|
                    h += torch.histc(flat[s : s + (1 << 20)].abs().float(), bins=DELLA_BINS, min=0.0, max=vmax).double()
                cum = torch.cumsum(h, 0) - 0.5 * h  # rank of a bin's middle entry
                cdfs.append(((cum - 0.5) / max(n - 1, 1)).clamp(0, 1).float())
                scales.append(DELLA_BINS / vmax)
            got = self._della[name] = (
                torch.stack(cdfs).to(self.device),
                torch.tensor(scales, dtype=torch.float32, device=self.device),
            )
            return got

    def ranks(self, name: str, start: int = 0, stop: int | None = None) -> Tensor:
        """DELLA's normalised |tau| ranks (``K x chunk``, float32) of entries [start, stop) of ``name``.

        Exact (by sort) for tensors of at most ``DELLA_BINS`` entries, otherwise looked up in the
        cumulative histogram (error below one bin's share of the entries).
        """
        d = self.deltas[name]
        k, n = d.shape[0], d[0].numel()
        stop = n if stop is None else stop
        flat = d.reshape(k, -1)[:, start:stop]
        if n <= DELLA_BINS:
            return della_ranks(d).reshape(k, -1)[:, start:stop].contiguous()
        cdf, scale = self.della_table(name)
        idx = (flat.abs().float() * scale.to(flat.device).view(k, 1)).long().clamp_(0, DELLA_BINS - 1)
        return torch.gather(cdf, 1, idx)

    def noise(self, seed: int, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """The uniforms (``K x chunk``, float32) of entries [start, stop) of tensor ``name`` under ``seed``
        (see :mod:`evomerge.merge.draws`); the whole tensor comes back in the deltas' shape."""
        d = self.deltas[name]
        k, n = d.shape[0], d[0].numel()
        stop = n if stop is None else stop
        u = draws_mod.uniforms(seed, name, k, start, stop, device=self.device, out=out)
        return u.reshape(d.shape) if (start, stop) == (0, n) else u

    def keys(self, seed: int, name: str, segment: int) -> Tensor:
        """The draws' keys of one segment of tensor ``name``, on the device (kept: a study's recipes
        usually share one seed)."""
        key = (seed, name, segment)
        got = self._key_cache.get(key)
        if got is None:
            if len(self._key_cache) > 4 * len(self.names) + 64:  # several seeds in turn: start over
                self._key_cache.clear()
            got = self._key_cache[key] = self.dev(draws_mod.noise_keys(seed, name, self.n_sources, segment))
        return got

    # ------------------------------------------------------------------------------------------
    # linear forms, source tensors, Fisher

    def linear_form(self, spec: OperatorSpec, params: dict[str, Any], name: str) -> tuple[float, list[float]] | None:
        """``(bscale, coefs)`` when the operator is linear in base and task vectors for this tensor once its
        gene-independent statistics are known (SLERP, Model Stock; computed once per tensor, cached)."""
        if spec.linear is None or spec.stats is None:
            return None
        per_op = self._stats.setdefault(name, {})
        st = per_op.get(spec.name)
        if st is None:
            with own_mappings():
                st = per_op[spec.name] = spec.stats(self.base[name], self.deltas[name])
        return spec.linear(st, self.n_sources, **params)

    def source_tensor(self, params: dict[str, Any], name: str) -> Tensor:
        """Tensor ``name`` of source ``params["source"]`` as stored (``-1``: the base), for passthrough."""
        src = int(params.get("source", 0))
        if src < 0:
            return self.base[name]
        if src >= self.n_sources:
            raise ValueError(f"passthrough source {src} out of range for {self.n_sources} sources")
        return self.readers[src].get_tied(name).to(self.device)

    def compute_fisher(
        self,
        texts: list[str] | list[list[int]],
        *,
        max_length: int = 256,
        cache_dir: str | Path | None = None,
        tokenizer: Any = None,
    ) -> None:
        """See :meth:`Materializer.compute_fisher <evomerge.merge.Materializer.compute_fisher>`."""
        key = fisher_key(texts, max_length)
        if self._fisher is not None and self._fisher_key == key:
            return
        per_source = [
            source_fisher(p, texts, device=self.device, max_length=max_length, cache_dir=cache_dir, tokenizer=tokenizer)
            for p in self.source_paths
        ]
        out: dict[str, Tensor] = {}
        for name in self.deltas:
            rows = []
            for path, fis in zip(self.source_paths, per_source, strict=True):
                f = fis.get(name)
                if f is None:
                    f = tied_alias(name, fis)
                if f is None:
                    raise KeyError(f"no Fisher for tensor {name!r} of {path}")
                rows.append(f.to(self.dtype))
            out[name] = torch.stack(rows).to(self.device)
        self._fisher, self._fisher_key = out, key

    def fisher(self, name: str) -> Tensor:
        if self._fisher is None:
            raise RuntimeError("the fisher operator needs Materializer.compute_fisher(texts) first")
        return self._fisher[name]
