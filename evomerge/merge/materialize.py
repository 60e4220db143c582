"""The materializer: turn a parameter-space :class:`~evomerge.recipe.Recipe` into weights, in memory.

:class:`Materializer` is the facade over three parts, each its own module:

- :mod:`evomerge.merge.checkpoint`: reading the models (a tensor at a time) and writing checkpoints;
- :mod:`evomerge.merge.resident`: the base and task vectors kept resident, with the indexes that do not
  depend on the candidate (magnitude order statistics, DELLA histograms, Fisher, linear-form stats);
- :mod:`evomerge.merge.execute`: merging a candidate: streamed chunks, fused kernels, or the whole
  model in one call of the C kernels.

The materializer itself resolves which recipe group covers each tensor and hands each tensor to the
executor. A lazy materializer holds nothing and streams a one-off merge a tensor at a time; see
:mod:`evomerge.merge.build` for ``evomerge merge`` (layer-stacking recipes included).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from evomerge.merge import native
from evomerge.merge.checkpoint import (
    LAYER_NAME_RE,
    Reader,
    TensorSource,
    block_config,
    config_layers,
    copy_tokenizer,
    read_config,
    save_state_dict,
)
from evomerge.merge.execute import DEFAULT_CHUNK, DEFAULT_CHUNK_ACCEL, Executor, group_params
from evomerge.merge.operators import OperatorSpec, get_operator, resolve_params
from evomerge.merge.resident import Resident, source_reader
from evomerge.recipe import LayerGroup, Recipe

__all__ = ["Materializer", "stacked_config"]


def stacked_config(cfg: dict[str, Any], blocks_from: list[int]) -> dict[str, Any]:
    """``cfg`` (a config.json dict, changed in place) for a model whose block ``i`` is block
    ``blocks_from[i]`` of the model ``cfg`` describes: the block count and per-block layer types."""
    holder = block_config(cfg)
    holder["num_hidden_layers"] = len(blocks_from)
    lt = holder.get("layer_types")
    if isinstance(lt, list) and lt:
        holder["layer_types"] = [lt[i % len(lt)] for i in blocks_from]
    return cfg


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
    free_group_params:
        let a recipe group override any method parameter (``lambda``, ``normalize``...), as translated
        mergekit configs do; by default a group overrides only the operator's per-group genes
        (``OperatorSpec.group_params``), so a misspelt gene fails.
    readers:
        ``(base, sources)`` to read instead of the folders at ``base_path`` and ``source_paths`` (which
        then only name them; the base's ``config.json`` is still read), e.g.
        :class:`~evomerge.merge.checkpoint.Renamed` views for a layer-stacking merge.
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
        free_group_params: bool = False,
        readers: tuple[TensorSource, list[TensorSource]] | None = None,
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
        self.cache_noise = cache_noise
        if chunk is None:
            chunk = DEFAULT_CHUNK if self.device.type == "cpu" else DEFAULT_CHUNK_ACCEL
        self.chunk = int(chunk)
        self.fused = fused
        self.native = bool(native)
        self.lazy = bool(lazy)
        self.num_layers = config_layers(read_config(self.base_path)) or 0
        if readers is None:
            readers = (Reader(self.base_path), [source_reader(p, self.base_path) for p in self.source_paths])
        self.resident = Resident(
            readers[0], readers[1], self.source_paths, device=self.device, dtype=dtype, trim_index=trim_index,
            quantile_points=quantile_points, lazy=self.lazy,
        )  # fmt: skip
        self.free_group_params = bool(free_group_params)
        self.executor = self._executor(self.resident)
        # group layout (kind, range, filter of each group) -> index of the group of each tensor in names
        self._layouts: dict[tuple, list[int]] = {}
        self._current: tuple[Recipe, list[int]] | None = None  # the recipe being built, its group index

    def _executor(self, res: Resident) -> Executor:
        return Executor(
            res, chunk=self.chunk, fused=self.fused, native=self.native, num_layers=self.num_layers,
            free_params=self.free_group_params,
        )  # fmt: skip

    # what callers read of the resident sources
    names = property(lambda self: self.resident.names, doc="Tensor names of the base checkpoint, in order.")
    base = property(lambda self: self.resident.base, doc="Base tensors by name (materializer dtype/device).")
    deltas = property(lambda self: self.resident.deltas, doc="``K x shape`` task vectors by name.")
    passthrough = property(lambda self: self.resident.passthrough, doc="Non-float tensors, copied from the base.")
    slots = property(lambda self: self.resident.slots, doc="Slot of each tensor (embed, head or block index).")

    def subset(self, indices: list[int]) -> Materializer:
        """A materializer over some of the sources that shares this one's resident tensors (views, no
        copy): e.g. a two-model SLERP out of a worker holding three sources."""
        sub = Materializer.__new__(Materializer)
        sub.__dict__.update(self.__dict__)
        sub.resident = self.resident.subset(indices)
        sub.source_paths = sub.resident.source_paths
        sub.executor = self._executor(sub.resident)
        sub._layouts, sub._current = {}, None
        return sub

    # ------------------------------------------------------------------------------------------
    # sizes and precomputation

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
        return self.resident.resident_bytes()

    def precompute_magnitudes(self) -> None:
        """Build the sorted-|tau| index used by magnitude trims for every tensor (else built per tensor
        on first use)."""
        if self.trim_index == "none":
            return
        for name in self.deltas:
            self.resident.magnitudes(name)

    def precompute_della(self) -> None:
        """Cumulative histograms of |tau| per tensor and source (DELLA's rank lookup) for every tensor
        (else built per tensor on first use)."""
        for name in self.deltas:
            self.resident.della_table(name)

    def thresholds(self, name: str, densities: Tensor) -> Tensor:
        """Per source, the magnitude threshold of a top-density trim of tensor ``name``."""
        return self.resident.thresholds(name, densities)

    def band_thresholds(self, name: str, densities: Tensor, gamma: float) -> Tensor:
        """Per source, the ``(lo, hi)`` |tau| band of a breadcrumbs trim of tensor ``name``."""
        return self.resident.band_thresholds(name, densities, gamma)

    def ranks(self, name: str, start: int = 0, stop: int | None = None) -> Tensor:
        """DELLA's normalised |tau| ranks (``K x chunk``, float32) of entries [start, stop) of ``name``."""
        return self.resident.ranks(name, start, stop)

    def noise(self, seed: int, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """The uniforms (``K x chunk``, float32) of entries [start, stop) of tensor ``name`` under ``seed``."""
        return self.resident.noise(seed, name, start, stop, out)

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
        self.resident.compute_fisher(texts, max_length=max_length, cache_dir=cache_dir, tokenizer=tokenizer)

    def fisher(self, name: str) -> Tensor:
        return self.resident.fisher(name)

    # ------------------------------------------------------------------------------------------
    # which group covers which tensor

    def _check(self, recipe: Recipe) -> tuple[OperatorSpec, dict[str, Any]]:
        if recipe.kind != "parameter_space":
            raise ValueError(f"the materializer builds parameter-space recipes, not {recipe.kind!r}")
        spec, params = self._check_light(recipe)
        index = self._group_index(recipe)  # every tensor must be covered (fail before writing anything)
        for gi in sorted(set(index)):
            group_params(spec, params, recipe.groups[gi], self.free_group_params)
        self._current = (recipe, index)
        return spec, params

    def _check_light(self, recipe: Recipe) -> tuple[OperatorSpec, dict[str, Any]]:
        if len(recipe.sources) != self.n_sources:
            raise ValueError(f"recipe has {len(recipe.sources)} sources, the materializer holds {self.n_sources}")
        spec = get_operator(recipe.method)
        spec.check_sources(self.n_sources)
        return spec, resolve_params(spec, recipe.params)

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

    def _group(self, recipe: Recipe, name: str) -> LayerGroup:
        cur = self._current
        if cur is not None and cur[0] is recipe:
            return recipe.groups[cur[1][self.resident.position[name]]]
        return recipe.groups[self._find_group(recipe, name)]

    # ------------------------------------------------------------------------------------------
    # merging

    def context(self, recipe: Recipe, name: str) -> dict[str, Any]:
        """Everything the materializer passes the operator for the whole tensor ``name`` (weights,
        densities, thresholds, draws, ranks, layer, Fisher...): ``spec.fn(base, deltas, **context)``
        gives what :meth:`merged_tensor` gives (the reference for the streamed and fused paths)."""
        spec, params = self._check_light(recipe)
        return self.executor.context(recipe.seed, spec, params, self._group(recipe, name), name)

    def merged_tensor(self, recipe: Recipe, name: str) -> Tensor:
        """One merged tensor (the materializer's dtype and device)."""
        spec, params = self._check_light(recipe)
        return self.executor.merged(recipe.seed, spec, params, self._group(recipe, name), name)

    @torch.no_grad()
    def merged_state_dict(self, recipe: Recipe, out_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Every merged tensor by checkpoint name (tied heads absent, as in the base checkpoint), in
        ``out_dtype`` (float tensors; default the materializer's dtype)."""
        return dict(self.iter_merged(recipe, out_dtype))

    @torch.no_grad()
    def iter_merged(self, recipe: Recipe, out_dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """``(name, merged tensor)`` in checkpoint order; see :meth:`merged_state_dict`."""
        spec, params = self._check(recipe)
        res, ex = self.resident, self.executor
        for name in self.names:
            if name not in res.base:
                res.load(name)
            t = ex.merged(recipe.seed, spec, params, self._group(recipe, name), name)
            if out_dtype is not None and t.is_floating_point() and t.dtype != out_dtype:
                t = t.to(out_dtype)
            if self.lazy:
                res.drop(name)
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
            segs, names = got  # the table, and the tensors it leaves to the loop below
            native.merge_segments(segs, self.n_sources, self.dtype)
        ex, seed, groups = self.executor, recipe.seed, recipe.groups
        index, position = self._current[1], self.resident.position
        for name in names:
            ex.write(seed, spec, params, groups[index[position[name]]], name, targets[name].detach())

    def _native_segments(
        self, recipe: Recipe, spec: OperatorSpec, params: dict[str, Any], targets: dict[str, Tensor]
    ) -> tuple[np.ndarray, list[str]] | None:
        """The candidate as one call of the C kernels, and the tensors it leaves out; ``None`` where
        those kernels do not apply (see :meth:`Executor.native_segments
        <evomerge.merge.execute.Executor.native_segments>`)."""
        return self.executor.native_segments(recipe, spec, params, self._group_index(recipe), targets)

    @torch.no_grad()
    def load_base(self, model: torch.nn.Module) -> None:
        """Write the base model's tensors into ``model``."""
        for name, tgt in self._targets(model).items():
            tgt.detach().copy_(self.base[name])

    @functools.cached_property
    def config(self) -> Any:
        """The base's transformers config (read when first needed: only building a model needs it)."""
        from transformers import AutoConfig  # seconds to import: only building a model needs it

        return AutoConfig.from_pretrained(self.base_path)

    def new_model(self):
        """A preallocated model with the base config on the device, in eval mode, holding the base weights."""
        from transformers import AutoModelForCausalLM  # (as in config)
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
            g = self._group(recipe, name)
            for _, _, chunk in self.executor.merge_chunks(recipe.seed, spec, params, g, name):
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
        copy_tokenizer(self.base_path, out)
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
        res = self.resident
        out: dict[str, Tensor] = {}
        for name in self.names:
            if not isinstance(self.slots[name], int):
                out[name] = res.base_reader.get(name)
        idx = 0
        for src, start, stop in slices:
            reader = res.base_reader if src < 0 else res.readers[src]
            if not 0 <= start < stop <= self.num_layers:
                raise ValueError(f"slice ({src}, {start}, {stop}) outside the {self.num_layers} blocks")
            for layer in range(start, stop):
                for name in self.names:
                    if self.slots[name] != layer:
                        continue
                    m = LAYER_NAME_RE.match(name)
                    out[f"{m['pre']}{idx}.{m['suf']}"] = reader.get(name)
                idx += 1
        return out, idx

    def save_stacked(self, slices: list[tuple[int, int, int]], out_dir: str | Path) -> Path:
        """Write :meth:`stacked_state_dict` as a Hugging Face folder (config's block count updated)."""
        sd, _ = self.stacked_state_dict(slices)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = stacked_config(read_config(self.base_path), [b for _, a, z in slices for b in range(a, z)])
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_state_dict(sd, out, max_shard_bytes=1 << 62)
        copy_tokenizer(self.base_path, out)
        return out
