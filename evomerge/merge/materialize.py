"""The materializer: turn a parameter-space :class:`~evomerge.recipe.Recipe` into weights, in memory.

A :class:`Materializer` loads the base and the source models once (tensor by tensor, so loading never
holds more than one extra tensor), keeps the base tensors and the stacked task vectors
``tau_t = theta_t - theta0`` resident on its device, and precomputes what does not depend on the
candidate:

- for magnitude trims (TIES, breadcrumbs), per tensor and source an index of |tau| order statistics,
  so the trim at any density is a lookup of the ``k``-th value (no sort, no top-k per candidate);
- for DELLA, per tensor and source a cumulative histogram of |tau|, so an entry's magnitude rank is a
  table lookup;
- for DARE and DELLA nothing: their draws are a hash of the entry's position (see
  :mod:`evomerge.merge.draws`), computed where they are used.

Per candidate, :meth:`Materializer.apply` streams each tensor in cache-sized chunks through the
operator (or a fused kernel from :mod:`evomerge.merge.kernels`, or for DELLA on the CPU the C kernel
of :mod:`evomerge.merge.native`) and writes the result straight into a preallocated model's parameters.
A fused CPU materializer merges the whole model in one call of :mod:`evomerge.merge.native`'s C kernels
where they apply (task arithmetic, linear, TIES, DARE, DARE-TIES, SLERP, Model Stock): per tensor it
only fills a row of the call's table, which takes the per-tensor overhead out of the candidate.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from evomerge.merge import draws as draws_mod
from evomerge.merge.operators import (
    OperatorSpec,
    Workspace,
    _band,
    get_operator,
    magnitude_thresholds,
    resolve_params,
    trim_count,
)
from evomerge.recipe import LayerGroup, Recipe, tensor_slot

__all__ = [
    "Materializer",
    "load_state_dict",
    "read_config",
    "config_layers",
    "tensor_seed",
    "tensor_generator",
    "TOKENIZER_FILES",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# Elements per chunk when streaming a tensor through an operator on CPU: big enough to amortise the
# Python and dispatch overhead, small enough that the K x chunk temporaries stay in cache (best of
# 2^14..2^20 measured on a 9M-parameter Llama). On accelerators whole tensors go at once.
DEFAULT_CHUNK = 1 << 18
DEFAULT_CHUNK_ACCEL = 1 << 26

DELLA_BINS = 4096


# glibc's mallopt parameter M_MMAP_THRESHOLD; the threshold while building resident tensors, and after
_M_MMAP_THRESHOLD = -3
_MMAP_OWN = 1 << 20
_MMAP_AFTER = 32 << 20  # glibc's own ceiling for its dynamic threshold
_mappings_depth = 0


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs: no mallopt
        return None


@contextlib.contextmanager
def _own_mappings() -> Iterator[None]:
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


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for tensor ``name`` under recipe seed ``seed`` (order- and device-independent)."""
    h = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator DARE uses for tensor ``name``; see :func:`tensor_seed`."""
    return torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))


class _Reader:
    """Tensors of a Hugging Face model folder, read one at a time (safetensors) or all at once (.bin)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files: dict[str, Path] = {}
        self._all: dict[str, Tensor] | None = None
        p = self.path
        if p.is_file() and p.suffix == ".safetensors":
            files = [p]
        elif (p / "model.safetensors.index.json").is_file():
            wm = json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]
            self._files = {k: p / v for k, v in wm.items()}
            files = []
        elif (p / "model.safetensors").is_file():
            files = [p / "model.safetensors"]
        else:
            files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
        if files:
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self._files[k] = f
        if not self._files:
            self._all = load_state_dict(p)

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor], path: str | Path) -> _Reader:
        r = cls.__new__(cls)
        r.path, r._files, r._all = Path(path), {}, tensors
        return r

    @classmethod
    def for_source(cls, path: str | Path, base_path: str | Path) -> _Reader:
        """A source's tensors; a PEFT LoRA adapter (or mergekit's ``model+adapter``) reads as base + B·A·scale."""
        from evomerge.merge.lora import is_lora_adapter, source_state_dict

        if is_lora_adapter(path) or ("+" in str(path) and not Path(path).exists()):
            return cls.from_dict(source_state_dict(path, load_state_dict(base_path)), path)
        return cls(path)

    def keys(self) -> list[str]:
        return list(self._all) if self._all is not None else list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in (self._all if self._all is not None else self._files)

    def get(self, name: str) -> Tensor | None:
        if self._all is not None:
            return self._all.get(name)
        f = self._files.get(name)
        if f is None:
            return None
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            return h.get_tensor(name)

    def get_tied(self, name: str) -> Tensor | None:
        t = self.get(name)
        if t is None and name.endswith("lm_head.weight"):
            for cand in ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight"):
                if cand in self:
                    return self.get(cand)
        return t


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


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a Hugging Face model folder (safetensors, sharded or not; ``.bin`` as fallback)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file():
        return load_file(str(p)) if p.suffix == ".safetensors" else torch.load(p, map_location="cpu", weights_only=True)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for s in shards:
            out.update(load_file(str(p / s)))
        return out
    single = p / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    files = sorted(p.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bin_index = p / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        out = {}
        for s in sorted(set(json.loads(bin_index.read_text())["weight_map"].values())):
            out.update(torch.load(p / s, map_location="cpu", weights_only=True))
        return out
    if (p / "pytorch_model.bin").is_file():
        return torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{p}: no model weights (model.safetensors, shards, or pytorch_model.bin)")


def read_config(path: str | Path) -> dict[str, Any]:
    """A model folder's ``config.json`` as a dict.

    The merge path needs only a few fields (layer count, dtype), and importing transformers' config
    classes for them costs about 2 s, most of a one-off merge's start-up.
    """
    f = Path(path) / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f}: not a JSON object")
    return cfg


def block_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that holds ``num_hidden_layers``: the top level, else ``text_config``
    (composite configs of vision-language models)."""
    text = cfg.get("text_config")
    if "num_hidden_layers" not in cfg and isinstance(text, dict) and "num_hidden_layers" in text:
        return text
    return cfg


def config_layers(cfg: dict[str, Any]) -> int | None:
    """The number of transformer blocks a config (as :func:`read_config` returns it) declares."""
    n = block_config(cfg).get("num_hidden_layers")
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


def _tied_alias(name: str, sd: dict[str, Tensor]) -> Tensor | None:
    """For a tied output head missing from a checkpoint, the input embedding it is tied to."""
    if name.endswith("lm_head.weight"):
        for cand in ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight"):
            if cand in sd:
                return sd[cand]
    return None


class Materializer:
    """Holds base and task vectors resident; builds any parameter-space recipe in memory.

    Parameters
    ----------
    base_path, source_paths:
        Hugging Face model folders (the order of ``source_paths`` is the order of ``Recipe.sources``).
    device, dtype:
        where and in which dtype the base, the task vectors and the models from :meth:`new_model` live.
        The operators compute in float32 whatever ``dtype`` is.
    trim_index:
        how magnitude trims (TIES, breadcrumbs) find their threshold. ``"quantile"`` (default) keeps
        ``quantile_points`` evenly spaced order statistics of |tau| per tensor and source and
        interpolates between them (exact for tensors of at most ``quantile_points`` entries; otherwise
        the kept count is off by at most ``numel / quantile_points``, 0.025% of the tensor by default);
        it costs ~nothing, so resident memory stays (sources + 2) model sizes with the model.
        ``"exact"`` keeps the full sorted |tau| (one more model size per source; matches mergekit's
        top-k exactly); ``"none"`` sorts per candidate (``kthvalue``; slow, no memory). Built lazily.
    cache_noise:
        kept for compatibility; random draws are hashes of positions and cost no memory.
    chunk:
        elements per streamed chunk in :meth:`apply` (default 2^18 on CPU, 2^26 elsewhere).
    lazy:
        hold nothing resident: :meth:`iter_merged` / :meth:`merged_state_dict` read one tensor of each
        model at a time, merge it and drop it (one-off merges such as ``evomerge merge``: memory is one
        tensor's sources plus the output, and nothing is read twice). A lazy materializer serves only
        those two methods.
    fused:
        use the fused kernels of :mod:`evomerge.merge.kernels` for the hot operators when they apply
        (``None``: on CPU when ``torch.compile`` works here); on the CPU, :meth:`apply` then runs the C
        kernels of :mod:`evomerge.merge.native` over the whole model where they build and apply.
    native:
        on the CPU, let :meth:`apply` run those C kernels even when not ``fused``: they need no
        ``torch.compile`` (a C compiler builds them in seconds, once per machine). Operators without
        one stay eager.
    """

    def __init__(
        self,
        base_path: str,
        source_paths: list[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        trim_index: Literal["exact", "quantile", "none"] = "quantile",
        quantile_points: int = 4097,
        cache_noise: bool = True,
        chunk: int | None = None,
        fused: bool = False,
        lazy: bool = False,
        native: bool = False,
    ) -> None:
        if not source_paths:
            raise ValueError("a merge needs at least one source model")
        if trim_index not in ("exact", "quantile", "none"):
            raise ValueError(f"trim_index must be 'exact', 'quantile' or 'none', not {trim_index!r}")
        self.base_path = str(base_path)
        self.source_paths = [str(s) for s in source_paths]
        self.device = torch.device(device)
        self.dtype = dtype
        self.trim_index = trim_index
        self.quantile_points = int(quantile_points)
        self.cache_noise = cache_noise
        if chunk is None:
            chunk = DEFAULT_CHUNK if self.device.type == "cpu" else DEFAULT_CHUNK_ACCEL
        self.chunk = int(chunk)
        self.fused = fused
        self.native = bool(native)
        self.num_layers = config_layers(read_config(self.base_path)) or 0

        base_r = _Reader(self.base_path)
        self._readers = [_Reader.for_source(p, self.base_path) for p in self.source_paths]
        self._base_reader = base_r
        self.names: list[str] = base_r.keys()
        self.base: dict[str, Tensor] = {}
        self.deltas: dict[str, Tensor] = {}  # name -> K x shape (float tensors only)
        self.passthrough: set[str] = set()  # non-float tensors, copied from the base as they are
        self.lazy = bool(lazy)
        if not self.lazy:
            with _own_mappings():
                for name in self.names:
                    self._load(name)
        self.slots: dict[str, str | int] = {n: tensor_slot(n) for n in self.names}
        self._position = {n: i for i, n in enumerate(self.names)}
        # name -> (K x P descending |tau| or its quantiles, positions of the quantiles or None)
        self._sorted: dict[str, tuple[Tensor, Tensor | None]] = {}
        self._sorted_views: dict[str, tuple[Tensor, np.ndarray, np.ndarray]] = {}  # numpy views of quantile tables
        self._della: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (K x BINS cdf, K scale)
        self._fisher: dict[str, Tensor] | None = None
        self._fisher_key: str | None = None
        self._like32 = torch.empty(0, dtype=torch.float32, device=self.device)  # scratch buffers' dtype/device
        # name -> operator -> gene-independent statistics (OperatorSpec.stats)
        self._stats: dict[str, dict[str, Tensor]] = {}
        self._key_cache: dict[tuple[int, str, int], Tensor] = {}
        # group layout (kind, range, filter of each group) -> index of the group of each tensor in names
        self._layouts: dict[tuple, list[int]] = {}
        self._current: tuple[Recipe, list[int]] | None = None  # the recipe being built, its group index
        # scratch buffers of the streamed chunks (one materializer serves one thread at a time)
        self._ws = Workspace()
        self._kernels = None

    def _load(self, name: str) -> None:
        """Read tensor ``name`` of the base and of every source; keep the base and the K task vectors."""
        b = self._base_reader.get(name)
        if not b.is_floating_point():
            self.base[name] = b.to(self.device)
            self.passthrough.add(name)
            return
        d = torch.empty((self.n_sources, *b.shape), dtype=self.dtype, device=self.device)
        on_cpu = self.device.type == "cpu"
        bflat = b.reshape(-1) if on_cpu else b.reshape(-1).to(self.device)
        # float32 differences a chunk at a time on the CPU: no tensor-sized temporaries at load
        step = 1 << 20 if on_cpu else max(1, bflat.numel())
        for i, (path, r) in enumerate(zip(self.source_paths, self._readers, strict=True)):
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

    def _drop(self, name: str) -> None:
        """Forget tensor ``name`` and what was computed from it (lazy mode: one tensor at a time)."""
        for cache in (self.base, self.deltas, self._sorted, self._sorted_views, self._della, self._stats):
            cache.pop(name, None)

    def subset(self, indices: list[int]) -> Materializer:
        """A materializer over some of the sources that shares this one's resident tensors (views, no
        copy): e.g. a two-model SLERP out of a worker holding three sources."""
        import copy

        idx = [int(i) for i in indices]
        sub = copy.copy(self)
        sub.source_paths = [self.source_paths[i] for i in idx]
        sub._readers = [self._readers[i] for i in idx]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            sub.deltas = {n: d[idx[0] : idx[0] + len(idx)] for n, d in self.deltas.items()}
        else:
            sub.deltas = {n: d[idx] for n, d in self.deltas.items()}
        sub._sorted, sub._sorted_views, sub._della, sub._fisher = {}, {}, {}, None
        sub._stats = {}
        sub._key_cache = {}
        sub._layouts, sub._current = {}, None
        sub._ws = Workspace()
        return sub

    # ------------------------------------------------------------------------------------------
    # sizes

    @property
    def n_sources(self) -> int:
        return len(self.source_paths)

    def numel(self) -> int:
        """Parameters of the merged model (tied tensors counted once)."""
        return sum(t.numel() for t in self.base.values())

    def model_bytes(self) -> int:
        """Bytes of one model in the materializer's dtype."""
        return sum(t.numel() * t.element_size() for t in self.base.values())

    def resident_bytes(self) -> int:
        """Bytes held resident: base, task vectors, magnitude indexes, DELLA histograms, Fisher."""
        tot = sum(t.numel() * t.element_size() for t in self.base.values())
        tot += sum(t.numel() * t.element_size() for t in self.deltas.values())
        if self._sorted:
            tot += sum(t.numel() * t.element_size() for t, _ in self._sorted.values())
        if self._della:
            tot += sum(a.numel() * a.element_size() for a, _ in self._della.values())
        if self._fisher:
            tot += sum(t.numel() * t.element_size() for t in self._fisher.values())
        return tot

    # ------------------------------------------------------------------------------------------
    # precomputation

    def precompute_magnitudes(self) -> None:
        """Build the sorted-|tau| index used by magnitude trims for every tensor (else built per tensor
        on first use)."""
        if self.trim_index == "none":
            return
        for name in self.deltas:
            self._magnitudes(name)

    def _magnitudes(self, name: str) -> tuple[Tensor, Tensor | None]:
        got = self._sorted.get(name)
        if got is not None:
            return got
        with _own_mappings():  # the sort's / histogram's temporaries must not fragment the heap
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
        table, pos = self._magnitudes(name)
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
        return torch.tensor(self._threshold_values(name, densities.tolist()), dtype=torch.float32)

    def _threshold_values(self, name: str, densities: list[float]) -> list[float]:
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

    def precompute_della(self) -> None:
        """Cumulative histograms of |tau| per tensor and source (DELLA's rank lookup) for every tensor
        (else built per tensor on first use)."""
        for name in self.deltas:
            self._della_table(name)

    def _della_table(self, name: str) -> tuple[Tensor, Tensor]:
        """``(K x BINS cdf, K scales)`` of tensor ``name``."""
        got = self._della.get(name)
        if got is not None:
            return got
        with _own_mappings():  # the sort's / histogram's temporaries must not fragment the heap
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
        from evomerge.merge.operators import della_ranks

        d = self.deltas[name]
        k, n = d.shape[0], d[0].numel()
        stop = n if stop is None else stop
        flat = d.reshape(k, -1)[:, start:stop]
        if n <= DELLA_BINS:
            return della_ranks(d).reshape(k, -1)[:, start:stop].contiguous()
        cdf, scale = self._della_table(name)
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

    # ------------------------------------------------------------------------------------------
    # Fisher information

    def compute_fisher(
        self,
        texts: list[str] | list[list[int]],
        *,
        max_length: int = 256,
        cache_dir: str | Path | None = None,
        tokenizer: Any = None,
    ) -> None:
        """Diagonal empirical Fisher of every source over ``texts``; kept for the ``fisher`` operator.

        Each text (a string, tokenized with the source's own tokenizer or ``tokenizer``, or a list of
        token ids) is one example: ``F = mean over texts of (d loss / d theta)^2`` with the causal
        LM loss of the text. Runs on the materializer's device, one source at a time, in float32.
        With ``cache_dir``, each source's Fisher is saved there (safetensors, keyed by the source
        path, the texts and ``max_length``) and reused by later processes. Calling again with the
        same texts does nothing.
        """
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM

        key = hashlib.sha256(json.dumps([texts, max_length], sort_keys=True).encode()).hexdigest()[:16]
        if self._fisher is not None and self._fisher_key == key:
            return
        per_source: list[dict[str, Tensor]] = []
        for path in self.source_paths:
            cfile = None
            if cache_dir is not None:
                h = hashlib.sha256(f"{Path(path).resolve()}\x00{key}".encode()).hexdigest()[:16]
                cfile = Path(cache_dir) / f"fisher-{h}.safetensors"
                if cfile.is_file():
                    per_source.append(load_file(str(cfile)))
                    continue
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device)
            model.eval()
            tok = tokenizer
            if tok is None and any(isinstance(t, str) for t in texts):
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(path)
            params = dict(model.named_parameters())
            acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            count = 0
            for text in texts:
                if isinstance(text, str):
                    ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
                else:
                    ids = torch.tensor([list(text)[:max_length]], dtype=torch.long)
                if ids.shape[1] < 2:
                    continue
                ids = ids.to(self.device)
                model.zero_grad(set_to_none=True)
                model(input_ids=ids, labels=ids).loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n].add_(p.grad.detach().float().pow(2))
                count += 1
            if count == 0:
                raise ValueError("compute_fisher: no text with at least two tokens")
            fis = {n: (a / count).cpu().contiguous() for n, a in acc.items()}
            del model, acc, params
            if cfile is not None:
                cfile.parent.mkdir(parents=True, exist_ok=True)
                save_file(fis, str(cfile))
            per_source.append(fis)
        out: dict[str, Tensor] = {}
        for name in self.deltas:
            rows = []
            for path, fis in zip(self.source_paths, per_source, strict=True):
                f = fis.get(name)
                if f is None:
                    f = _tied_alias(name, fis)
                if f is None:
                    raise KeyError(f"no Fisher for tensor {name!r} of {path}")
                rows.append(f.to(self.dtype))
            out[name] = torch.stack(rows).to(self.device)
        self._fisher, self._fisher_key = out, key

    def fisher(self, name: str) -> Tensor:
        if self._fisher is None:
            raise RuntimeError("the fisher operator needs Materializer.compute_fisher(texts) first")
        return self._fisher[name]

    # ------------------------------------------------------------------------------------------
    # merging

    def _check(self, recipe: Recipe) -> tuple[OperatorSpec, dict[str, Any]]:
        if recipe.kind != "parameter_space":
            raise ValueError(f"the materializer builds parameter-space recipes, not {recipe.kind!r}")
        spec, params = self._check_light(recipe)
        index = self._group_index(recipe)  # every tensor must be covered (fail before writing anything)
        for gi in sorted(set(index)):
            self._params(spec, params, recipe.groups[gi])
        self._current = (recipe, index)
        return spec, params

    def _group_index(self, recipe: Recipe) -> list[int]:
        """For each tensor of ``names``, the index of the recipe group that covers it. Candidates of one
        search share their group layout, so this is computed once per layout."""
        layout = tuple((g.kind, g.start, g.stop, g.filter) for g in recipe.groups)
        got = self._layouts.get(layout)
        if got is None:
            got = [self._find_group(recipe, name) for name in self.names]
            if len(self._layouts) >= 64:  # many layouts in turn (a DFS search, tests): start over
                self._layouts.clear()
            self._layouts[layout] = got
        return got

    def _find_group(self, recipe: Recipe, name: str) -> int:
        slot = self.slots[name]
        for gi, g in enumerate(recipe.groups):
            if g.matches(name, slot):  # block range, and the group's tensor-name filter if any
                return gi
        raise KeyError(f"no layer group of the recipe covers tensor {name!r} (slot {slot!r})")

    def _check_light(self, recipe: Recipe) -> tuple[OperatorSpec, dict[str, Any]]:
        if len(recipe.sources) != self.n_sources:
            raise ValueError(f"recipe has {len(recipe.sources)} sources, the materializer holds {self.n_sources}")
        spec = get_operator(recipe.method)
        spec.check_sources(self.n_sources)
        return spec, resolve_params(spec, recipe.params)

    def _group(self, recipe: Recipe, name: str) -> LayerGroup:
        cur = self._current
        if cur is not None and cur[0] is recipe:
            return recipe.groups[cur[1][self._position[name]]]
        return recipe.groups[self._find_group(recipe, name)]

    @staticmethod
    def _params(spec: OperatorSpec, params: dict[str, Any], g: LayerGroup) -> dict[str, Any]:
        """Method params with the group's overrides (genes such as SLERP's ``t``)."""
        gp = getattr(g, "params", None) or {}
        if not gp:
            return params
        bad = set(gp) - set(spec.group_params)
        if bad:
            raise ValueError(
                f"group {g.name!r}: method {spec.name!r} takes no per-group {sorted(bad)} "
                f"(per-group params: {list(spec.group_params)})"
            )
        return {**params, **gp}

    def _inputs(
        self, recipe: Recipe, spec: OperatorSpec, params: dict[str, Any], name: str
    ) -> tuple[dict[str, Any], Tensor, Tensor, str | None, frozenset[str], dict[str, Any]]:
        g = self._group(recipe, name)
        params = self._params(spec, params, g)
        k = self.n_sources
        # genes and what derives from them are built on the host and sent without a synchronisation,
        # so a GPU materializer never waits on the device between tensors
        w = torch.tensor(g.weights, dtype=torch.float32)
        dens = torch.tensor(g.densities if g.densities is not None else [1.0] * k, dtype=torch.float32)
        sp, ctx = spec.resolved(params)
        extra: dict[str, Any] = {}
        if sp == "magnitude":
            extra["thresholds"] = self._dev(self.thresholds(name, dens))
        elif sp == "outliers":
            gamma = params.get("gamma", (params.get("base_params") or {}).get("gamma", 0.01))
            extra["thresholds"] = self._dev(self.band_thresholds(name, dens, float(gamma)))
        if "layer" in ctx:
            extra["layer"] = self.slots[name]
            extra["num_layers"] = self.num_layers
        if "name" in ctx:
            extra["name"] = name
        return params, w, dens, sp, ctx, extra

    def _dev(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True) if t.device != self.device else t

    def context(self, recipe: Recipe, name: str) -> dict[str, Any]:
        """Everything the materializer passes the operator for the whole tensor ``name`` (weights,
        densities, thresholds, draws, ranks, layer, Fisher...): ``spec.fn(base, deltas, **context)``
        gives what :meth:`merged_tensor` gives (the reference for the streamed and fused paths)."""
        spec, params = self._check_light(recipe)
        params, w, dens, sp, ctx, extra = self._inputs(recipe, spec, params, name)
        if self._draws(sp, dens):
            extra["noise"] = self.noise(recipe.seed, name)
            if sp == "della":
                extra["ranks"] = self.ranks(name).reshape(self.deltas[name].shape)
        if "fisher" in ctx:
            extra["fisher"] = self.fisher(name)
        if "source_tensor" in ctx:
            extra["source_tensor"] = self._source_tensor(params, name)
        return {"weights": self._dev(w), "densities": self._dev(dens), **extra, **params}

    def _source_tensor(self, params: dict[str, Any], name: str) -> Tensor:
        src = int(params.get("source", 0))
        if src < 0:
            return self.base[name]
        if src >= self.n_sources:
            raise ValueError(f"passthrough source {src} out of range for {self.n_sources} sources")
        t = self._readers[src].get_tied(name)
        return t.to(self.device)

    @staticmethod
    def _draws(sp: str | None, dens: Tensor) -> bool:
        """Whether an operator of this sparsification drops entries at random at these densities."""
        return sp in ("random", "della") and bool((dens < 1).any())

    def _chunkable(self, sp: str | None, ctx: frozenset[str], params: dict[str, Any]) -> bool:
        if ctx & {"whole", "source_tensor"}:
            return False
        if sp in ("random", "della"):
            r = params.get("rescale", (params.get("base_params") or {}).get("rescale"))
            return not (r is True or r == "l1")
        return True

    def _merge_chunks(
        self, recipe: Recipe, spec: OperatorSpec, params: dict[str, Any], name: str, out_flat: Tensor | None = None
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(start, stop, merged_flat_chunk)`` for tensor ``name``. With ``out_flat`` (the
        flat target, materializer dtype) a fused kernel writes into it and yields views of it."""
        params, w, dens, sp, ctx, extra = self._inputs(recipe, spec, params, name)
        base = self.base[name]
        d = self.deltas[name]
        k = d.shape[0]
        n = base.numel()
        draw = self._draws(sp, dens)
        lin = self._linear_form(spec, params, name)
        if lin is not None:
            yield from self._linear_chunks(name, lin[0], lin[1], out_flat)
            return
        if not self._chunkable(sp, ctx, params):
            if draw:
                extra["noise"] = self.noise(recipe.seed, name)
                if sp == "della":
                    extra["ranks"] = self.ranks(name).reshape(d.shape)
            if "fisher" in ctx:
                extra["fisher"] = self.fisher(name)
            if "source_tensor" in ctx:
                extra["source_tensor"] = self._source_tensor(params, name)
            out = spec.fn(base.to(torch.float32), d.to(torch.float32), self._dev(w), self._dev(dens), **extra, **params)
            yield 0, n, out.reshape(-1)
            return
        kern = self._kernel(spec, sp, ctx, params)
        if kern is not None and sp == "della" and n <= DELLA_BINS:
            kern = None  # exact ranks by sort for small tensors: the eager path
        bflat = base.reshape(-1)
        dflat = d.reshape(k, -1)
        fflat = self.fisher(name).reshape(k, -1) if "fisher" in ctx else None
        wd, densd = (w, dens) if kern is not None else (self._dev(w), self._dev(dens))  # kernels take host ones
        step = self.chunk
        if kern is not None:
            # one fused pass over the whole tensor (a segment at a time when drawing: one key each)
            step = draws_mod.SEGMENT if draw else n
            if draw and sp == "della":
                extra["della_cdf"], extra["della_scale"] = self._della_table(name)
        for s in range(0, n, max(step, 1)):
            e = min(n, s + step)
            if draw and kern is not None:
                extra["noise_keys"] = self._keys(recipe.seed, name, s // draws_mod.SEGMENT)
            if draw and kern is None:
                extra["noise"] = self.noise(
                    recipe.seed, name, s, e, out=self._ws.get("noise", (k, e - s), self._like32)
                ).reshape(k, e - s)
                if sp == "della":
                    extra["ranks"] = self.ranks(name, s, e)
            if fflat is not None:
                extra["fisher"] = fflat[:, s:e]
            if kern is not None:
                tgt = (
                    out_flat[s:e] if out_flat is not None else torch.empty(e - s, dtype=self.dtype, device=self.device)
                )
                yield s, e, kern(tgt, bflat[s:e], dflat[:, s:e], w, dens, extra)
                continue
            out = spec.fn(
                bflat[s:e].to(torch.float32),
                dflat[:, s:e].to(torch.float32),
                wd,
                densd,
                workspace=self._ws,
                **extra,
                **params,
            )
            yield s, e, out

    def _keys(self, seed: int, name: str, segment: int) -> Tensor:
        """The draws' keys of one segment of tensor ``name``, on the device (kept: a study's recipes
        usually share one seed)."""
        key = (seed, name, segment)
        got = self._key_cache.get(key)
        if got is None:
            if len(self._key_cache) > 4 * len(self.names) + 64:  # several seeds in turn: start over
                self._key_cache.clear()
            got = self._key_cache[key] = self._dev(draws_mod.noise_keys(seed, name, self.n_sources, segment))
        return got

    def _linear_form(self, spec: OperatorSpec, params: dict[str, Any], name: str) -> tuple[float, list[float]] | None:
        """``(bscale, coefs)`` when the operator is linear in base and task vectors for this tensor once its
        gene-independent statistics are known (SLERP, Model Stock; computed once per tensor, cached)."""
        if spec.linear is None or spec.stats is None:
            return None
        per_op = self._stats.setdefault(name, {})
        st = per_op.get(spec.name)
        if st is None:
            with _own_mappings():
                st = per_op[spec.name] = spec.stats(self.base[name], self.deltas[name])
        return spec.linear(st, self.n_sources, **params)

    def _linear_chunks(
        self, name: str, bscale: float, coefs: list[float], out_flat: Tensor | None
    ) -> Iterator[tuple[int, int, Tensor]]:
        bflat = self.base[name].reshape(-1)
        dflat = self.deltas[name].reshape(self.n_sources, -1)
        n = bflat.numel()
        kern = None
        if self.fused:
            from evomerge.merge import kernels

            kern = kernels.linear_kernel(self.device)
        if kern is not None:
            tgt = out_flat if out_flat is not None else torch.empty(n, dtype=self.dtype, device=self.device)
            c = torch.tensor(coefs, dtype=torch.float32)
            yield 0, n, kern(tgt, bflat, dflat, c, bscale)
            return
        for s in range(0, n, max(self.chunk, 1)):
            e = min(n, s + self.chunk)
            acc = self._ws.get("lin", (e - s,), self._like32)
            torch.mul(bflat[s:e], bscale, out=acc)
            for i, c in enumerate(coefs):
                if c != 0:
                    acc.add_(dflat[i, s:e], alpha=c)
            yield s, e, acc

    def _kernel(self, spec, sp, ctx, params):
        from evomerge.merge import kernels

        if self.fused:
            return kernels.for_operator(spec.name, params, self.device)
        if self.native and self.device.type == "cpu":
            return kernels.native_della(spec.name, params, self.dtype, self.n_sources)
        return None

    @staticmethod
    def _put(dst: Tensor, chunk: Tensor) -> None:
        if chunk.data_ptr() != dst.data_ptr() or chunk.dtype != dst.dtype:
            dst.copy_(chunk)

    def merged_tensor(self, recipe: Recipe, name: str) -> Tensor:
        """One merged tensor (the materializer's dtype and device)."""
        spec, params = self._check_light(recipe)
        return self._merged(recipe, spec, params, name)

    def _merged(self, recipe: Recipe, spec: OperatorSpec, params: dict[str, Any], name: str) -> Tensor:
        base = self.base[name]
        if name in self.passthrough:
            return base.clone()
        out = torch.empty(base.numel(), dtype=self.dtype, device=self.device)
        for s, e, chunk in self._merge_chunks(recipe, spec, params, name, out):
            self._put(out[s:e], chunk)
        return out.reshape(base.shape)

    @torch.no_grad()
    def merged_state_dict(self, recipe: Recipe, out_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Every merged tensor by checkpoint name (tied heads absent, as in the base checkpoint), in
        ``out_dtype`` (float tensors; default the materializer's dtype)."""
        return dict(self.iter_merged(recipe, out_dtype))

    @torch.no_grad()
    def iter_merged(self, recipe: Recipe, out_dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """``(name, merged tensor)`` in checkpoint order; see :meth:`merged_state_dict`."""
        spec, params = self._check(recipe)
        for name in self.names:
            if name not in self.base:
                self._load(name)
            t = self._merged(recipe, spec, params, name)
            if out_dtype is not None and t.is_floating_point() and t.dtype != out_dtype:
                t = t.to(out_dtype)
            if self.lazy:
                self._drop(name)
            yield name, t

    def _targets(self, model: torch.nn.Module) -> dict[str, Tensor]:
        sd = model.state_dict(keep_vars=True)
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise KeyError(f"the model has no tensor(s) {missing[:5]}; was it made by new_model()?")
        out = {n: sd[n] for n in self.names}
        written = {t.data_ptr() for t in out.values()}
        stray = [
            n
            for n, t in sd.items()
            if n not in out
            and t.data_ptr() not in written
            and t.is_floating_point()
            and isinstance(t, torch.nn.Parameter)
        ]
        if stray:
            raise KeyError(
                f"the model has parameter(s) {stray[:5]} that the base checkpoint lacks and that "
                "are not tied to one it has (untied head in a tied checkpoint?)"
            )
        return out

    @torch.no_grad()
    def apply(self, recipe: Recipe, model: torch.nn.Module) -> None:
        """Write the recipe's merged tensors into ``model`` in place (no disk, no reallocation)."""
        spec, params = self._check(recipe)
        targets = self._targets(model)
        names = self.names
        got = self._native_segments(recipe, spec, params, targets)
        if got is not None:
            from evomerge.merge import native

            segs, names = got  # the table, and the tensors it leaves to the loop below
            native.merge_segments(segs, self.n_sources, self.dtype)
        for name in names:
            tgt = targets[name].detach()
            if name in self.passthrough:
                tgt.copy_(self.base[name])
                continue
            if not tgt.is_contiguous():  # a model whose parameters were re-laid out: merge, then copy
                tgt.copy_(self._merged(recipe, spec, params, name).reshape(tgt.shape))
                continue
            flat = tgt.view(-1)
            for s, e, chunk in self._merge_chunks(
                recipe, spec, params, name, flat if flat.dtype == self.dtype else None
            ):
                self._put(flat[s:e], chunk)

    def _native_segments(
        self, recipe: Recipe, spec: OperatorSpec, params: dict[str, Any], targets: dict[str, Tensor]
    ) -> tuple[np.ndarray, list[str]] | None:
        """The candidate as one call of the C kernels (:func:`native.merge_segments`): a row per
        tensor, with its addresses and its group's kernel arguments; and the tensors left out, which
        :meth:`apply` merges one by one: the passthrough ones, and those of groups where DELLA draws
        (its C kernel takes one tensor per call). ``None`` where the kernels do not
        apply, and :meth:`apply` goes tensor by tensor: neither ``fused`` nor ``native``, not the CPU,
        another dtype, more sources than the kernels take, an operator without such a kernel, or a
        target that is not a contiguous tensor of the materializer's dtype."""
        from evomerge.merge import kernels, native

        k = self.n_sources
        if not (
            (self.fused or self.native)
            and self.device.type == "cpu"
            and self.dtype in (torch.bfloat16, torch.float32)
            and k <= native.KMAX
            and native.available()
        ):
            return None
        ops = {"ta": native.OP_LINEAR, "ties": native.OP_TIES, "dare": native.OP_DARE, "dare_ties": native.OP_DARE_TIES}
        zeros, index = [0.0] * k, self._group_index(recipe)
        plans: dict[int, tuple[dict[str, Any], kernels.Plan | None, list[float]]] = {}  # None: a linear form
        for gi in sorted(set(index)):
            g = recipe.groups[gi]
            gp = self._params(spec, params, g)
            dens = torch.tensor(g.densities if g.densities is not None else [1.0] * k, dtype=torch.float32)
            if spec.linear is not None and spec.stats is not None:
                plans[gi] = (gp, None, [])
                continue
            sp, ctx = spec.resolved(gp)
            if not self._chunkable(sp, ctx, gp):
                return None
            pl = kernels.plan(spec.name, gp, torch.tensor(g.weights, dtype=torch.float32), dens, self._draws(sp, dens))
            if pl is None or (pl.kernel not in ops and pl.kernel != "della"):
                return None
            plans[gi] = (gp, pl, dens.tolist())
        size = torch.empty(0, dtype=self.dtype).element_size()
        rows: list[tuple[Any, ...]] = []
        rest: list[str] = []
        fixed: dict[int, tuple[Any, ...]] = {}  # group index -> its columns from op to below, as lists
        for name in self.names:
            gi = index[self._position[name]]
            gp, pl, dens = plans[gi]
            if name in self.passthrough or (pl is not None and pl.kernel == "della"):
                rest.append(name)
                continue
            t, b, d = targets[name], self.base[name], self.deltas[name].reshape(k, -1)
            if not (t.dtype == self.dtype and t.device.type == "cpu" and t.is_contiguous() and d.stride(1) == 1):
                return None
            if pl is None:  # SLERP, Model Stock: a linear form per tensor, from its cached statistics
                lin = self._linear_form(spec, gp, name)
                if lin is None:
                    return None
                cols = (native.OP_LINEAR, 0, 1.0, lin[0], lin[1], zeros, zeros, [0] * k)
            else:
                cols = fixed.get(gi)
                if cols is None:
                    below = pl.below.tolist() if pl.below is not None else [0] * k
                    cols = fixed[gi] = (ops[pl.kernel], int(pl.normalize), pl.lam, pl.bscale, pl.coef.tolist(),
                                        pl.w.tolist(), [-math.inf] * k, below)  # fmt: skip
                if pl.trim:
                    cols = (*cols[:6], self._threshold_values(name, dens), cols[7])
            n = b.numel()
            drawn = pl is not None and pl.below is not None
            for s in range(0, n, draws_mod.SEGMENT):  # draw segments: a key each (one for most tensors)
                keys = self._keys(recipe.seed, name, s // draws_mod.SEGMENT).tolist() if drawn else None
                rows.append((b.data_ptr() + s * size, d.data_ptr() + s * size, t.data_ptr() + s * size,
                             min(n - s, draws_mod.SEGMENT), d.stride(0), *cols, keys))  # fmt: skip
        segs = np.zeros(len(rows), dtype=native.SEGMENT)
        if not rows:
            return segs, rest
        fields = ("b", "d", "out", "n", "dstride", "op", "normalize", "lam", "bscale")
        cols_t = list(zip(*rows, strict=True))
        for f, v in zip(fields, cols_t, strict=False):
            segs[f] = v
        for j, f in enumerate(("coef", "w", "thr", "below"), start=len(fields)):
            segs[f][:, :k] = cols_t[j]
        keyed = [i for i, r in enumerate(rows) if r[-1] is not None]
        if keyed:
            segs["keys"][keyed, : (k + 1) // 2] = [rows[i][-1] for i in keyed]
        return segs, rest

    @torch.no_grad()
    def load_base(self, model: torch.nn.Module) -> None:
        """Write the base model's tensors into ``model``."""
        for name, tgt in self._targets(model).items():
            tgt.detach().copy_(self.base[name])

    @functools.cached_property
    def config(self) -> Any:
        """The base's transformers config (read when first needed: only building a model needs it)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.base_path)

    def new_model(self):
        """A preallocated model with the base config on the device, in eval mode, holding the base weights."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        # no_init_weights also skips the tying done at init; without it a tied head stays garbage
        model.tie_weights()
        model.to(self.device)
        model.eval()
        self.load_base(model)
        return model

    @torch.no_grad()
    def param_count(self, recipe: Recipe | None = None, *, nonzero: bool = True, model=None) -> int:
        """Parameters of the merged model, tied tensors once.

        ``nonzero`` (default) counts the entries that are not exactly zero (the ``params`` cost
        objective); pass ``model`` to count an already applied model instead of merging again. With
        ``nonzero=False`` this is the total parameter count and needs no recipe.
        """
        if not nonzero:
            return self.numel()
        if model is not None:
            return sum(int(torch.count_nonzero(t)) for t in self._targets(model).values())
        if recipe is None:
            raise ValueError("counting non-zero parameters needs a recipe or an applied model")
        spec, params = self._check(recipe)
        total = 0
        for name in self.names:
            if name in self.passthrough:
                total += int(torch.count_nonzero(self.base[name]))
                continue
            for _, _, chunk in self._merge_chunks(recipe, spec, params, name):
                total += int(torch.count_nonzero(chunk.to(self.dtype)))
        return total

    def save_merged(self, recipe: Recipe, out_dir: str | Path, *, model=None, write_recipe: bool = True) -> Path:
        """Write the merged model as a Hugging Face folder: safetensors, config, tokenizer from the base.

        Also writes ``evomerge_recipe.json`` (the recipe, so the folder says how it was made) unless
        ``write_recipe`` is false. Pass ``model`` to reuse a preallocated model.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if model is None:
            model = self.new_model()
        self.apply(recipe, model)
        model.save_pretrained(str(out), safe_serialization=True)
        src = Path(self.base_path)
        for fname in TOKENIZER_FILES:
            f = src / fname
            if f.is_file() and not (out / fname).exists():
                shutil.copy2(f, out / fname)
        if write_recipe:
            (out / "evomerge_recipe.json").write_text(recipe.model_dump_json(indent=2) + "\n")
        return out

    # ------------------------------------------------------------------------------------------
    # layer stacking (passthrough with slices)

    def stacked_state_dict(self, slices: list[tuple[int, int, int]]) -> tuple[dict[str, Tensor], int]:
        """A deeper (or shallower) model made of block ranges: ``slices`` lists ``(source, start, stop)``
        (``source`` -1 for the base), and the blocks are renumbered in order. Embeddings, final norm
        and head come from the base. Tensors are read as stored (bit-exact copies). Returns the state
        dict and the new block count."""
        import re

        pat = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")
        out: dict[str, Tensor] = {}
        for name in self.names:
            if not isinstance(self.slots[name], int):
                out[name] = self._base_reader.get(name)
        idx = 0
        for src, start, stop in slices:
            reader = self._base_reader if src < 0 else self._readers[src]
            if not 0 <= start < stop <= self.num_layers:
                raise ValueError(f"slice ({src}, {start}, {stop}) outside the {self.num_layers} blocks")
            for layer in range(start, stop):
                for name in self.names:
                    if self.slots[name] != layer:
                        continue
                    m = pat.match(name)
                    out[f"{m.group(1)}{idx}{m.group(3)}"] = reader.get(name)
                idx += 1
        return out, idx

    def save_stacked(self, slices: list[tuple[int, int, int]], out_dir: str | Path) -> Path:
        """Write :meth:`stacked_state_dict` as a Hugging Face folder (config's block count updated)."""
        from safetensors.torch import save_file

        sd, n = self.stacked_state_dict(slices)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = json.loads((Path(self.base_path) / "config.json").read_text())
        cfg["num_hidden_layers"] = n
        if isinstance(cfg.get("layer_types"), list) and cfg["layer_types"]:
            cfg["layer_types"] = [cfg["layer_types"][0]] * n
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
        src = Path(self.base_path)
        for fname in TOKENIZER_FILES:
            f = src / fname
            if f.is_file() and not (out / fname).exists():
                shutil.copy2(f, out / fname)
        return out
