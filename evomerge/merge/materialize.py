"""The materializer: turn a parameter-space :class:`~evomerge.recipe.Recipe` into weights, in memory.

A :class:`Materializer` loads the base and the source models once, keeps the base tensors and the
stacked task vectors ``tau_t = theta_t - theta0`` resident on its device, and precomputes what does
not depend on the candidate:

- for magnitude trims (TIES), per tensor and per source the |tau| sorted in descending order, so the
  trim at any density is a lookup of the ``k``-th value (no sort, no top-k per candidate);
- for DARE, the uniform draws of the drop mask for the current seed (drawn once per seed on the CPU
  generator, so a candidate rebuilds bit for bit on any device, then cached).

Per candidate, :meth:`Materializer.apply` streams each tensor in cache-sized chunks through the
operator and writes the result straight into a preallocated model's parameters with ``copy_``.

DARE seeding: the mask of tensor ``name`` under ``recipe.seed`` comes from a CPU ``torch.Generator``
seeded with ``tensor_seed(recipe.seed, name)`` (a hash of both), drawing ``K x shape`` uniforms at
once; it does not depend on the order tensors are visited, on the device, or on the chunking.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from evomerge.merge.operators import OperatorSpec, Workspace, get_operator, resolve_params, trim_count
from evomerge.recipe import LayerGroup, Recipe, tensor_slot

__all__ = ["Materializer", "load_state_dict", "tensor_seed", "tensor_generator", "TOKENIZER_FILES"]

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


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for tensor ``name`` under recipe seed ``seed`` (order- and device-independent)."""
    h = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator DARE uses for tensor ``name``; see :func:`tensor_seed`."""
    return torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))


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
        how magnitude trims (TIES) find their threshold: ``"exact"`` keeps the full descending-sorted
        |tau| per tensor and source (as much memory again as the task vectors; the lookup is exact and
        matches mergekit's top-k); ``"quantile"`` keeps ``quantile_points`` evenly spaced order
        statistics and interpolates (kept count off by at most ``numel / quantile_points``);
        ``"none"`` sorts per candidate (``kthvalue``; slow, no memory). Built lazily on the first recipe
        that needs it.
    cache_noise:
        keep the DARE uniforms of the last seed resident (memory: one float32 per task-vector entry), so
        candidates sharing a seed draw nothing. Off: each DARE tensor draws afresh (same values).
    chunk:
        elements per streamed chunk in :meth:`apply` (default 2^18 on CPU, 2^26 elsewhere).
    """

    def __init__(
        self,
        base_path: str,
        source_paths: list[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        trim_index: Literal["exact", "quantile", "none"] = "exact",
        quantile_points: int = 4097,
        cache_noise: bool = True,
        chunk: int | None = None,
    ) -> None:
        from transformers import AutoConfig

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
        self.config = AutoConfig.from_pretrained(self.base_path)

        base_sd = load_state_dict(self.base_path)
        self.names: list[str] = list(base_sd.keys())
        self.base: dict[str, Tensor] = {}
        self.deltas: dict[str, Tensor] = {}  # name -> K x shape (float tensors only)
        self.passthrough: set[str] = set()  # non-float tensors, copied from the base as they are
        src_sds = [load_state_dict(p) for p in self.source_paths]
        for name in self.names:
            b = base_sd[name]
            if not b.is_floating_point():
                self.base[name] = b.to(self.device)
                self.passthrough.add(name)
                continue
            b32 = b.to(torch.float32)
            rows = []
            for path, sd in zip(self.source_paths, src_sds, strict=True):
                t = sd.get(name)
                if t is None:
                    t = _tied_alias(name, sd)
                if t is None:
                    raise KeyError(f"source {path} has no tensor {name!r} (the base has it)")
                if t.shape != b.shape:
                    raise ValueError(f"{name}: shape {tuple(t.shape)} in {path}, {tuple(b.shape)} in the base")
                rows.append((t.to(torch.float32) - b32).to(dtype))
            self.base[name] = b.to(device=self.device, dtype=dtype)
            self.deltas[name] = torch.stack(rows).to(self.device)
            del rows
        del base_sd, src_sds
        self.slots: dict[str, str | int] = {n: tensor_slot(n) for n in self.names}
        # name -> (K x P descending |tau| or its quantiles, positions of the quantiles or None)
        self._sorted: dict[str, tuple[Tensor, Tensor | None]] | None = None
        self._noise_seed: int | None = None
        self._noise: dict[str, Tensor] = {}
        # scratch buffers of the streamed chunks (one materializer serves one thread at a time)
        self._ws = Workspace()

    # ------------------------------------------------------------------------------------------
    # sizes

    @property
    def n_sources(self) -> int:
        return len(self.source_paths)

    def numel(self) -> int:
        """Parameters of the merged model (tied tensors counted once)."""
        return sum(t.numel() for t in self.base.values())

    def resident_bytes(self) -> int:
        """Bytes held resident: base, task vectors, sorted-magnitude tables and cached DARE draws."""
        tot = sum(t.numel() * t.element_size() for t in self.base.values())
        tot += sum(t.numel() * t.element_size() for t in self.deltas.values())
        if self._sorted:
            tot += sum(t.numel() * t.element_size() for t, _ in self._sorted.values())
        tot += sum(t.numel() * t.element_size() for t in self._noise.values())
        return tot

    # ------------------------------------------------------------------------------------------
    # precomputation

    def precompute_magnitudes(self) -> None:
        """Build the sorted-|tau| tables used by magnitude trims (done lazily on first use)."""
        if self._sorted is not None or self.trim_index == "none":
            return
        tables: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name, d in self.deltas.items():
            k = d.shape[0]
            s = torch.sort(d.reshape(k, -1).abs().to(torch.float32), dim=1, descending=True).values
            pos = None
            if self.trim_index == "quantile" and s.shape[1] > self.quantile_points:
                pos = torch.linspace(0, s.shape[1] - 1, self.quantile_points).round().long()
                s = s.index_select(1, pos.to(s.device)).contiguous()
            tables[name] = (s.to(self.dtype).cpu() if self.device.type == "cpu" else s.to(self.dtype), pos)
        self._sorted = tables

    def thresholds(self, name: str, densities: Tensor) -> Tensor:
        """Per source, the magnitude threshold of a top-density trim of tensor ``name``."""
        d = self.deltas[name]
        k, n = d.shape[0], d[0].numel()
        out = torch.empty(k, dtype=torch.float32)
        if self.trim_index == "none":
            from evomerge.merge.operators import magnitude_thresholds

            return magnitude_thresholds(d, densities)
        self.precompute_magnitudes()
        table, pos = self._sorted[name]  # type: ignore[index]
        for i in range(k):
            keep = trim_count(float(densities[i]), n)
            if keep >= n:
                out[i] = -math.inf
            elif keep == 0:
                out[i] = math.inf
            elif pos is None:  # exact: the keep-th largest |tau|
                out[i] = float(table[i, keep - 1])
            else:  # quantile table: interpolate between the stored order statistics around keep - 1
                j = keep - 1
                hi = int(torch.searchsorted(pos, torch.tensor([j])))
                hi = min(hi, pos.numel() - 1)
                if int(pos[hi]) == j or hi == 0:
                    out[i] = float(table[i, hi])
                else:
                    lo = hi - 1
                    f = (j - int(pos[lo])) / (int(pos[hi]) - int(pos[lo]))
                    out[i] = float(table[i, lo]) * (1 - f) + float(table[i, hi]) * f
        return out

    def noise(self, seed: int, name: str) -> Tensor:
        """The DARE uniforms (``K x shape``, float32) of tensor ``name`` under ``seed``."""
        if self.cache_noise:
            if self._noise_seed != seed:
                self._noise = {}
                self._noise_seed = seed
            u = self._noise.get(name)
            if u is None:
                u = self._draw(seed, name)
                self._noise[name] = u
            return u
        return self._draw(seed, name)

    def _draw(self, seed: int, name: str) -> Tensor:
        shape = self.deltas[name].shape
        u = torch.rand(shape, generator=tensor_generator(seed, name), dtype=torch.float32)
        return u.to(self.device)

    # ------------------------------------------------------------------------------------------
    # merging

    def _check(self, recipe: Recipe) -> tuple[OperatorSpec, dict[str, Any]]:
        if recipe.kind != "parameter_space":
            raise ValueError(f"the materializer builds parameter-space recipes, not {recipe.kind!r}")
        if len(recipe.sources) != self.n_sources:
            raise ValueError(f"recipe has {len(recipe.sources)} sources, the materializer holds {self.n_sources}")
        spec = get_operator(recipe.method)
        params = resolve_params(spec, recipe.params)
        for name in self.names:  # every tensor must be covered (fail before writing anything)
            self._group(recipe, name)
        return spec, params

    def _group(self, recipe: Recipe, name: str) -> LayerGroup:
        slot = self.slots[name]
        for g in recipe.groups:
            if g.contains(slot):
                return g
        raise KeyError(f"no layer group of the recipe covers tensor {name!r} (slot {slot!r})")

    def _chunkable(self, spec: OperatorSpec, params: dict[str, Any]) -> bool:
        # every operator is elementwise once thresholds and noise are given, except DARE's L1 rescale
        if spec.sparsify == "random":
            r = params.get("rescale")
            return not (r is True or r == "l1")
        return True

    def _merge_chunks(
        self, recipe: Recipe, spec: OperatorSpec, params: dict[str, Any], name: str
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(start, stop, merged_flat_chunk)`` for tensor ``name`` (float32 chunks)."""
        g = self._group(recipe, name)
        base = self.base[name]
        d = self.deltas[name]
        k = d.shape[0]
        w = torch.tensor(g.weights, dtype=torch.float32, device=self.device)
        dens = torch.tensor(
            g.densities if g.densities is not None else [1.0] * k, dtype=torch.float32, device=self.device
        )
        thr = noise = None
        if spec.sparsify == "magnitude":
            thr = self.thresholds(name, dens).to(self.device)
        elif spec.sparsify == "random" and bool((dens < 1).any()):
            noise = self.noise(recipe.seed, name)
        n = base.numel()
        bflat = base.reshape(-1)
        dflat = d.reshape(k, -1)
        nflat = noise.reshape(k, -1) if noise is not None else None
        step = self.chunk if self._chunkable(spec, params) else n
        for s in range(0, n, max(step, 1)):
            e = min(n, s + step)
            out = spec.fn(
                bflat[s:e].to(torch.float32),
                dflat[:, s:e].to(torch.float32),
                w,
                dens,
                thresholds=thr,
                noise=nflat[:, s:e] if nflat is not None else None,
                workspace=self._ws if step == self.chunk else None,
                **params,
            )
            yield s, e, out

    def merged_tensor(self, recipe: Recipe, name: str) -> Tensor:
        """One merged tensor (the materializer's dtype and device)."""
        spec, params = self._check_light(recipe)
        return self._merged(recipe, spec, params, name)

    def _check_light(self, recipe: Recipe) -> tuple[OperatorSpec, dict[str, Any]]:
        if len(recipe.sources) != self.n_sources:
            raise ValueError(f"recipe has {len(recipe.sources)} sources, the materializer holds {self.n_sources}")
        spec = get_operator(recipe.method)
        return spec, resolve_params(spec, recipe.params)

    def _merged(self, recipe: Recipe, spec: OperatorSpec, params: dict[str, Any], name: str) -> Tensor:
        base = self.base[name]
        if name in self.passthrough:
            return base.clone()
        out = torch.empty(base.numel(), dtype=self.dtype, device=self.device)
        for s, e, chunk in self._merge_chunks(recipe, spec, params, name):
            out[s:e].copy_(chunk)
        return out.reshape(base.shape)

    @torch.no_grad()
    def merged_state_dict(self, recipe: Recipe) -> dict[str, Tensor]:
        """Every merged tensor by checkpoint name (tied heads absent, as in the base checkpoint)."""
        spec, params = self._check(recipe)
        return {name: self._merged(recipe, spec, params, name) for name in self.names}

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
        for name in self.names:
            tgt = targets[name].detach()
            if name in self.passthrough:
                tgt.copy_(self.base[name])
                continue
            flat = tgt.view(-1)
            for s, e, chunk in self._merge_chunks(recipe, spec, params, name):
                flat[s:e].copy_(chunk)

    @torch.no_grad()
    def load_base(self, model: torch.nn.Module) -> None:
        """Write the base model's tensors into ``model``."""
        for name, tgt in self._targets(model).items():
            tgt.detach().copy_(self.base[name])

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
