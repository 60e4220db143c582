"""Execution strategies of a merge over :class:`~evomerge.merge.resident.Resident` sources.

- per tensor, streamed: each tensor goes through the operator in cache-sized chunks (or one fused
  kernel of :mod:`evomerge.merge.kernels`, or for DELLA on the CPU the C kernel of
  :mod:`evomerge.merge.native`), written straight into its target;
- per tensor, whole: operators that need the whole tensor (SVD-based ones, passthrough's stored
  tensor, DARE's L1 rescale) get it at once;
- native batch: on the CPU the whole candidate is one call of the C kernels, a row of the call's table
  per tensor (task arithmetic, linear, TIES, DARE, DARE-TIES, SLERP, Model Stock), which takes the
  per-tensor overhead out of the candidate.

:func:`tensor_needs` is the one place that reads an operator's sparsification and context: what the
resident sources must supply for a group's tensors, and which strategies can run it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evomerge.merge import draws as draws_mod
from evomerge.merge import kernels, native
from evomerge.merge.operators import OperatorSpec, Workspace
from evomerge.merge.resident import DELLA_BINS, Resident
from evomerge.recipe import LayerGroup, Recipe

__all__ = ["DEFAULT_CHUNK", "DEFAULT_CHUNK_ACCEL", "Executor", "Needs", "group_params", "tensor_needs"]

# Elements per chunk when streaming a tensor through an operator on CPU: big enough to amortise the
# Python and dispatch overhead, small enough that the K x chunk temporaries stay in cache (best of
# 2^14..2^20 measured on a 9M-parameter Llama). On accelerators whole tensors go at once.
DEFAULT_CHUNK = 1 << 18
DEFAULT_CHUNK_ACCEL = 1 << 26


# ----------------------------------------------------------------------------------------------
# dispatch: what an operator needs, from its spec


@dataclass(frozen=True)
class Needs:
    """What a group's tensors need, from the operator's (resolved) sparsification and context."""

    sparsify: str | None
    context: frozenset[str]
    draws: bool  # drops entries at random at these densities (DARE, DELLA): uniforms or their keys
    ranks: bool  # DELLA's |tau| ranks
    chunkable: bool  # elementwise once its inputs are known: streamed in chunks, or a fused kernel

    def trim(self, res: Resident, name: str, dens: Tensor, params: dict[str, Any]) -> Tensor | None:
        """The per-source thresholds of a magnitude trim (or breadcrumbs' bands) of tensor ``name``."""
        if self.sparsify == "magnitude":
            return res.dev(res.thresholds(name, dens))
        if self.sparsify == "outliers":
            gamma = params.get("gamma", (params.get("base_params") or {}).get("gamma", 0.01))
            return res.dev(res.band_thresholds(name, dens, float(gamma)))
        return None

    def fused_fits(self, numel: int) -> bool:
        """Whether a fused kernel may take a tensor of ``numel`` entries (DELLA ranks small tensors
        exactly, by sort, on the eager path)."""
        return not (self.sparsify == "della" and numel <= DELLA_BINS)


def tensor_needs(spec: OperatorSpec, params: dict[str, Any], dens: Tensor) -> Needs:
    """:class:`Needs` of operator ``spec`` with (group-resolved) ``params`` at densities ``dens``."""
    sp, ctx = spec.resolved(params)
    random = sp in ("random", "della")
    chunkable = not (ctx & {"whole", "source_tensor"})
    if chunkable and random:  # the L1 rescale normalises over the whole tensor
        r = params.get("rescale", (params.get("base_params") or {}).get("rescale"))
        chunkable = not (r is True or r == "l1")
    return Needs(sp, ctx, random and bool((dens < 1).any()), sp == "della", chunkable)


# the C kernels' op codes by the kernel a plan names (kernels.plan); DELLA has its own C kernel
NATIVE_OPS = native.KERNEL_OPS


def group_params(spec: OperatorSpec, params: dict[str, Any], g: LayerGroup, free: bool = False) -> dict[str, Any]:
    """Method params with the group's overrides: the operator's per-group genes (such as SLERP's ``t``),
    or with ``free`` any of its params (a mergekit config may vary every parameter per tensor)."""
    gp = getattr(g, "params", None) or {}
    if not gp:
        return params
    allowed = spec.params if free else spec.group_params
    bad = set(gp) - set(allowed)
    if bad:
        raise ValueError(
            f"group {g.name!r}: method {spec.name!r} takes no per-group {sorted(bad)} "
            f"(per-group params: {list(allowed)})"
        )
    return {**params, **gp}


def _densities(g: LayerGroup, k: int) -> Tensor:
    return torch.tensor(g.densities if g.densities is not None else [1.0] * k, dtype=torch.float32)


def _put(dst: Tensor, chunk: Tensor) -> None:
    if chunk.data_ptr() != dst.data_ptr() or chunk.dtype != dst.dtype:
        dst.copy_(chunk)


# ----------------------------------------------------------------------------------------------
# execution


class Executor:
    """Merges tensors of ``res``: streamed chunks, fused kernels, or the native batch call.

    One executor serves one thread at a time (its chunks' scratch buffers are shared).
    """

    def __init__(
        self, res: Resident, *, chunk: int, fused: bool, native: bool, num_layers: int = 0, free_params: bool = False
    ) -> None:
        self.res = res
        self.free_params = free_params  # groups may override any method param (see group_params)
        self.num_layers = num_layers  # the model's block count, for operators that read the "layer"
        self.device, self.dtype = res.device, res.dtype
        self.chunk = int(chunk)
        self.fused = fused
        self.native = bool(native)
        self.ws = Workspace()
        self._like32 = torch.empty(0, dtype=torch.float32, device=self.device)  # scratch buffers' dtype/device

    def _inputs(
        self, spec: OperatorSpec, params: dict[str, Any], g: LayerGroup, name: str
    ) -> tuple[dict[str, Any], Tensor, Tensor, Needs, dict[str, Any]]:
        params = group_params(spec, params, g, self.free_params)
        # genes and what derives from them are built on the host and sent without a synchronisation,
        # so a GPU materializer never waits on the device between tensors
        w = torch.tensor(g.weights, dtype=torch.float32)
        dens = _densities(g, self.res.n_sources)
        nd = tensor_needs(spec, params, dens)
        extra: dict[str, Any] = {}
        thr = nd.trim(self.res, name, dens, params)
        if thr is not None:
            extra["thresholds"] = thr
        if "layer" in nd.context:
            extra["layer"] = self.res.slots[name]
            extra["num_layers"] = self.num_layers
        if "name" in nd.context:
            extra["name"] = name
        return params, w, dens, nd, extra

    def _whole_inputs(self, seed: int, nd: Needs, params: dict[str, Any], name: str, extra: dict[str, Any]) -> None:
        """Add the whole-tensor inputs (draws, ranks, Fisher, stored source tensor) to ``extra``."""
        res = self.res
        if nd.draws:
            extra["noise"] = res.noise(seed, name)
            if nd.ranks:
                extra["ranks"] = res.ranks(name).reshape(res.deltas[name].shape)
        if "fisher" in nd.context:
            extra["fisher"] = res.fisher(name)
        if "source_tensor" in nd.context:
            extra["source_tensor"] = res.source_tensor(params, name)

    def context(self, seed: int, spec: OperatorSpec, params: dict[str, Any], g: LayerGroup, name: str) -> dict:
        """Every input of the operator for the whole tensor ``name``, as keyword arguments."""
        params, w, dens, nd, extra = self._inputs(spec, params, g, name)
        self._whole_inputs(seed, nd, params, name, extra)
        return {"weights": self.res.dev(w), "densities": self.res.dev(dens), **extra, **params}

    def merged(self, seed: int, spec: OperatorSpec, params: dict[str, Any], g: LayerGroup, name: str) -> Tensor:
        """Tensor ``name`` merged (the executor's dtype and device)."""
        base = self.res.base[name]
        if name in self.res.passthrough:
            return base.clone()
        out = torch.empty(base.numel(), dtype=self.dtype, device=self.device)
        for s, e, chunk in self.merge_chunks(seed, spec, params, g, name, out):
            _put(out[s:e], chunk)
        return out.reshape(base.shape)

    def write(
        self, seed: int, spec: OperatorSpec, params: dict[str, Any], g: LayerGroup, name: str, tgt: Tensor
    ) -> None:
        """Merge tensor ``name`` into ``tgt`` (a model's parameter) in place."""
        if name in self.res.passthrough:
            tgt.copy_(self.res.base[name])
            return
        if not tgt.is_contiguous():  # a model whose parameters were re-laid out: merge, then copy
            tgt.copy_(self.merged(seed, spec, params, g, name).reshape(tgt.shape))
            return
        flat = tgt.view(-1)
        for s, e, chunk in self.merge_chunks(seed, spec, params, g, name, flat if flat.dtype == self.dtype else None):
            _put(flat[s:e], chunk)

    def merge_chunks(
        self,
        seed: int,
        spec: OperatorSpec,
        params: dict[str, Any],
        g: LayerGroup,
        name: str,
        out_flat: Tensor | None = None,
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(start, stop, merged_flat_chunk)`` for tensor ``name``. With ``out_flat`` (the
        flat target, executor dtype) a fused kernel writes into it and yields views of it."""
        res = self.res
        params, w, dens, nd, extra = self._inputs(spec, params, g, name)
        base = res.base[name]
        d = res.deltas[name]
        k = d.shape[0]
        n = base.numel()
        lin = res.linear_form(spec, params, name)
        if lin is not None:
            yield from self._linear_chunks(name, lin[0], lin[1], out_flat)
            return
        if not nd.chunkable:
            self._whole_inputs(seed, nd, params, name, extra)
            out = spec.fn(base.to(torch.float32), d.to(torch.float32), res.dev(w), res.dev(dens), **extra, **params)
            yield 0, n, out.reshape(-1)
            return
        kern = self._kernel(spec, params) if nd.fused_fits(n) else None
        bflat = base.reshape(-1)
        dflat = d.reshape(k, -1)
        fflat = res.fisher(name).reshape(k, -1) if "fisher" in nd.context else None
        wd, densd = (w, dens) if kern is not None else (res.dev(w), res.dev(dens))  # kernels take host ones
        draw = nd.draws
        step = self.chunk
        if kern is not None:
            # one fused pass over the whole tensor (a segment at a time when drawing: one key each)
            step = draws_mod.SEGMENT if draw else n
            if draw and nd.ranks:
                extra["della_cdf"], extra["della_scale"] = res.della_table(name)
        for s in range(0, n, max(step, 1)):
            e = min(n, s + step)
            if draw and kern is not None:
                extra["noise_keys"] = res.keys(seed, name, s // draws_mod.SEGMENT)
            if draw and kern is None:
                extra["noise"] = res.noise(
                    seed, name, s, e, out=self.ws.get("noise", (k, e - s), self._like32)
                ).reshape(k, e - s)
                if nd.ranks:
                    extra["ranks"] = res.ranks(name, s, e)
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
                workspace=self.ws,
                **extra,
                **params,
            )
            yield s, e, out

    def _linear_chunks(
        self, name: str, bscale: float, coefs: list[float], out_flat: Tensor | None
    ) -> Iterator[tuple[int, int, Tensor]]:
        bflat = self.res.base[name].reshape(-1)
        dflat = self.res.deltas[name].reshape(self.res.n_sources, -1)
        n = bflat.numel()
        kern = kernels.linear_kernel(self.device) if self.fused else None
        if kern is not None:
            tgt = out_flat if out_flat is not None else torch.empty(n, dtype=self.dtype, device=self.device)
            c = torch.tensor(coefs, dtype=torch.float32)
            yield 0, n, kern(tgt, bflat, dflat, c, bscale)
            return
        for s in range(0, n, max(self.chunk, 1)):
            e = min(n, s + self.chunk)
            acc = self.ws.get("lin", (e - s,), self._like32)
            torch.mul(bflat[s:e], bscale, out=acc)
            for i, c in enumerate(coefs):
                if c != 0:
                    acc.add_(dflat[i, s:e], alpha=c)
            yield s, e, acc

    def _kernel(self, spec: OperatorSpec, params: dict[str, Any]) -> Callable[..., Tensor] | None:
        if self.fused:
            return kernels.for_operator(spec.name, params, self.device)
        if self.native and self.device.type == "cpu":
            return kernels.native_della(spec.name, params, self.dtype, self.res.n_sources)
        return None

    # ------------------------------------------------------------------------------------------
    # the native batch call

    def native_segments(
        self,
        recipe: Recipe,
        spec: OperatorSpec,
        params: dict[str, Any],
        index: list[int],
        targets: dict[str, Tensor],
    ) -> tuple[np.ndarray, list[str]] | None:
        """The candidate as one call of the C kernels (:func:`native.merge_segments`): a row per
        tensor, with its addresses and its group's kernel arguments; and the tensors left out, which
        the caller merges one by one: the passthrough ones, and those of groups where DELLA draws
        (its C kernel takes one tensor per call). ``None`` where the kernels do not apply, and the
        caller goes tensor by tensor: neither ``fused`` nor ``native``, not the CPU, another dtype,
        more sources than the kernels take, an operator without such a kernel, or a target that is not
        a contiguous tensor of the executor's dtype. ``index``: the group of each tensor of ``res.names``."""
        res = self.res
        k = res.n_sources
        if not (
            (self.fused or self.native)
            and self.device.type == "cpu"
            and self.dtype in (torch.bfloat16, torch.float32)
            and k <= native.KMAX
            and native.available()
        ):
            return None
        zeros = [0.0] * k
        plans: dict[int, tuple[dict[str, Any], kernels.Plan | None, list[float]]] = {}  # None: a linear form
        for gi in sorted(set(index)):
            g = recipe.groups[gi]
            gp = group_params(spec, params, g, self.free_params)
            dens = _densities(g, k)
            if spec.linear is not None and spec.stats is not None:
                plans[gi] = (gp, None, [])
                continue
            nd = tensor_needs(spec, gp, dens)
            if not nd.chunkable:
                return None
            pl = kernels.plan(spec.name, gp, torch.tensor(g.weights, dtype=torch.float32), dens, nd.draws)
            if pl is None or (pl.kernel not in NATIVE_OPS and pl.kernel != "della"):
                return None
            plans[gi] = (gp, pl, dens.tolist())
        size = torch.empty(0, dtype=self.dtype).element_size()
        rows: list[tuple[Any, ...]] = []
        rest: list[str] = []
        fixed: dict[int, tuple[Any, ...]] = {}  # group index -> its columns from op to below, as lists
        for name in res.names:
            gi = index[res.position[name]]
            gp, pl, dens = plans[gi]
            if name in res.passthrough or (pl is not None and pl.kernel == "della"):
                rest.append(name)
                continue
            t, b, d = targets[name], res.base[name], res.deltas[name].reshape(k, -1)
            if not (t.dtype == self.dtype and t.device.type == "cpu" and t.is_contiguous() and d.stride(1) == 1):
                return None
            if pl is None:  # SLERP, Model Stock: a linear form per tensor, from its cached statistics
                lin = res.linear_form(spec, gp, name)
                if lin is None:
                    return None
                cols = (native.OP_LINEAR, 0, 1.0, lin[0], lin[1], zeros, zeros, [0] * k)
            else:
                cols = fixed.get(gi)
                if cols is None:
                    below = pl.below.tolist() if pl.below is not None else [0] * k
                    cols = fixed[gi] = (NATIVE_OPS[pl.kernel], int(pl.normalize), pl.lam, pl.bscale, pl.coef.tolist(),
                                        pl.w.tolist(), [-math.inf] * k, below)  # fmt: skip
                if pl.trim:
                    cols = (*cols[:6], res.threshold_values(name, dens), cols[7])
            n = b.numel()
            drawn = pl is not None and pl.below is not None
            for s in range(0, n, draws_mod.SEGMENT):  # draw segments: a key each (one for most tensors)
                keys = res.keys(recipe.seed, name, s // draws_mod.SEGMENT).tolist() if drawn else None
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
