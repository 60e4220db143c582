"""Genotype <-> recipe for the data-flow genome (the layer-path search of Akiba et al. 2024).

The M = sum(num_layers) blocks of all models are laid out in order (model 0's blocks 0..L0-1, then
model 1's, ...) and that sequence is repeated ``repeats`` times: T = M * repeats slots. Genes, all in
[0, 1] like every genome of evomerge:

1. ``T`` indicator genes, ``keep/r{rep}/m{k}.L{l}``: the slot's block is in the path when its gene is
   above 0.5 (the unit-cube analogue of the paper's "> 0"). Kept slots run in slot order.
2. scale genes, mapped linearly onto ``scale_bounds``; the hidden state entering block j is multiplied
   by W[i, j], where i is the block that ran before it (or the embeddings for the first step). The
   paper's full M x M matrix is rarely affordable for CMA-ES, so ``scales`` picks a parametrization:

   - ``none``: no genes, every scale is 1;
   - ``per_layer``: M genes, W[i, j] = w[j] (one scale per target block);
   - ``per_source_layer`` (default): K * M genes, W[i, j] = w[model(i), j] -- one scale per target
     block and per model the hidden state comes from (the distribution shift the paper's scales
     correct is mostly "which model produced this state"), the embeddings count as the embed source;
   - ``full``: (M + 1) * M genes, the paper's W plus a row for the embeddings.

Pinning: with ``pin_first`` the embed source's block 0 always opens the path and with ``pin_last`` the
head source's last block always closes it; pinned steps are outside the T slots (a pinned block can
still appear again through its slots) and take their scales from W like every step. Embeddings and
tokenizer come from ``models[embed_source]`` (model A), final norm and LM head from
``models[head_source]``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from evomerge.genomes.data_flow.recipe import DataFlowRecipe
from evomerge.genomes.data_flow.sources import is_ps_recipe_file, resolve_source, study_recipe
from evomerge.genomes.data_flow.spec import DataFlowGenomeSpec, ScaleMode
from evomerge.study_refs import is_study_ref
from evomerge.zoo import RECIPES, parse_zoo_uri, zoo_uri_built

KEEP_THRESHOLD = 0.5


def read_block_count(ref: str) -> int:
    """Decoder block count of a model reference (zoo://, local folder, or an exported PS/DFS folder)."""
    if ref.startswith("zoo://"):
        if not zoo_uri_built(ref):
            return int(RECIPES[parse_zoo_uri(ref)[0]]["model"]["layers"])  # known before the zoo is built (dry runs)
    if is_ps_recipe_file(ref):
        data = json.loads(Path(ref).read_text())
        if not data.get("slices"):  # a PS merge keeps its base's block count; no need to build it
            return read_block_count(data["base"])
    if is_study_ref(ref):
        recipe = study_recipe(ref)
        if not recipe.slices:
            return read_block_count(recipe.base)
    cfg = Path(resolve_source(ref)) / "config.json"
    if not cfg.is_file():
        raise ValueError(f"model {ref!r} is not a local folder; give genome.num_layers")
    data = json.loads(cfg.read_text())
    n = data.get("num_hidden_layers") or data.get("n_layer") or data.get("num_layers")
    if not n:
        raise ValueError(f"{cfg}: no num_hidden_layers")
    return int(n)


class DataFlowGenome:
    """Layer-path genome over ``repeats`` repetitions of all models' blocks, with input scales."""

    kind = "data_flow"

    def __init__(
        self,
        models: Sequence[str],
        num_layers_per_model: Sequence[int],
        repeats: int = 2,
        scales: ScaleMode = "per_source_layer",
        scale_bounds: tuple[float, float] = (0.5, 1.5),
        pin_first: bool = True,
        pin_last: bool = True,
        embed_source: int = 0,
        head_source: int = 0,
    ) -> None:
        self.models = [str(m) for m in models]
        self.num_layers = [int(n) for n in num_layers_per_model]
        if len(self.models) != len(self.num_layers) or not self.models:
            raise ValueError("give one block count per model (and at least one model)")
        if repeats < 1:
            raise ValueError("repeats must be >= 1")
        if scales not in ("none", "per_layer", "per_source_layer", "full"):
            raise ValueError(f"unknown scale parametrization {scales!r}")
        if scale_bounds[0] >= scale_bounds[1]:
            raise ValueError("scale_bounds: lower bound must be below upper bound")
        k = len(self.models)
        if not (0 <= embed_source < k and 0 <= head_source < k):
            raise ValueError("embed_source / head_source must be model indices")
        self.repeats = int(repeats)
        self.scale_mode = scales
        self.scale_bounds = (float(scale_bounds[0]), float(scale_bounds[1]))
        self.pin_first = bool(pin_first)
        self.pin_last = bool(pin_last)
        self.embed_source = int(embed_source)
        self.head_source = int(head_source)
        # The M blocks in layout order, and each block's position in it.
        self.blocks: list[tuple[int, int]] = [(m, layer) for m, n in enumerate(self.num_layers) for layer in range(n)]
        self.offset = {b: i for i, b in enumerate(self.blocks)}
        self.M = len(self.blocks)
        self.T = self.M * self.repeats

    @classmethod
    def from_spec(
        cls, spec: DataFlowGenomeSpec, models: Sequence[str], num_layers: Sequence[int] | None = None
    ) -> DataFlowGenome:
        """Build from a space's genome block; block counts from ``num_layers``, the spec, or the configs."""
        spec.check_models(len(models))
        counts = num_layers if num_layers is not None else spec.num_layers
        if counts is None:
            counts = [read_block_count(m) for m in models]
        return cls(
            models,
            counts,
            repeats=spec.repeats,
            scales=spec.scales,
            scale_bounds=spec.scale_bounds,
            pin_first=spec.pin_first,
            pin_last=spec.pin_last,
            embed_source=spec.embed_source,
            head_source=spec.head_source,
        )

    # -- layout ----------------------------------------------------------------------------------

    @property
    def n_scale_genes(self) -> int:
        return {
            "none": 0,
            "per_layer": self.M,
            "per_source_layer": len(self.models) * self.M,
            "full": (self.M + 1) * self.M,
        }[self.scale_mode]

    @property
    def dim(self) -> int:
        return self.T + self.n_scale_genes

    def _bname(self, b: tuple[int, int]) -> str:
        return f"m{b[0]}.L{b[1]}"

    def gene_names(self) -> list[str]:
        names = [f"keep/r{r}/{self._bname(b)}" for r in range(self.repeats) for b in self.blocks]
        if self.scale_mode == "per_layer":
            names += [f"scale/{self._bname(b)}" for b in self.blocks]
        elif self.scale_mode == "per_source_layer":
            names += [f"scale/from_m{s}/{self._bname(b)}" for s in range(len(self.models)) for b in self.blocks]
        elif self.scale_mode == "full":
            rows = ["emb"] + [self._bname(b) for b in self.blocks]
            names += [f"scale/from_{r}/{self._bname(b)}" for r in rows for b in self.blocks]
        return names

    def scale_gene(self, prev: tuple[int, int] | None, target: tuple[int, int]) -> int | None:
        """Index of the gene holding W[prev, target] (prev None: the embeddings); None when fixed at 1."""
        j = self.offset[target]
        if self.scale_mode == "none":
            return None
        if self.scale_mode == "per_layer":
            return self.T + j
        if self.scale_mode == "per_source_layer":
            src = self.embed_source if prev is None else prev[0]
            return self.T + src * self.M + j
        row = 0 if prev is None else 1 + self.offset[prev]
        return self.T + row * self.M + j

    def pinned_first(self) -> tuple[int, int] | None:
        return (self.embed_source, 0) if self.pin_first else None

    def pinned_last(self) -> tuple[int, int] | None:
        return (self.head_source, self.num_layers[self.head_source] - 1) if self.pin_last else None

    # -- decode / encode ---------------------------------------------------------------------------

    def _scale(self, g: float) -> float:
        lo, hi = self.scale_bounds
        return lo + (hi - lo) * g

    def decode(self, x: Sequence[float]) -> DataFlowRecipe:
        if len(x) != self.dim:
            raise ValueError(f"genome has {self.dim} genes, got {len(x)}")
        g = [min(1.0, max(0.0, float(v))) for v in x]
        path: list[tuple[int, int]] = []
        first, last = self.pinned_first(), self.pinned_last()
        if first is not None:
            path.append(first)
        for t in range(self.T):
            if g[t] > KEEP_THRESHOLD:
                path.append(self.blocks[t % self.M])
        if last is not None:
            path.append(last)
        scales: list[float] = []
        prev: tuple[int, int] | None = None
        for step in path:
            i = self.scale_gene(prev, step)
            scales.append(1.0 if i is None else self._scale(g[i]))
            prev = step
        return DataFlowRecipe(
            models=list(self.models),
            num_layers=list(self.num_layers),
            path=path,
            scales=scales,
            embed_source=self.embed_source,
            head_source=self.head_source,
        )

    def unit_scale_gene(self) -> float:
        """The gene value that decodes to scale 1 (clipped to [0, 1] when 1 is outside the bounds)."""
        lo, hi = self.scale_bounds
        return min(1.0, max(0.0, (1.0 - lo) / (hi - lo)))

    def encode_model(self, model: int, keep: float = 1.0, drop: float = 0.0) -> list[float]:
        """Genes that decode to ``model``'s own blocks in order with every scale 1.

        With pinning and ``model`` equal to the embed and head source, that is exactly the model
        itself (a natural starting point for CMA-ES; use e.g. keep=0.6, drop=0.4 for a mean near the
        centre). ``keep`` / ``drop`` are the indicator values used.
        """
        x = [drop] * self.T + [self.unit_scale_gene()] * self.n_scale_genes
        first, last = self.pinned_first(), self.pinned_last()
        for layer in range(self.num_layers[model]):
            b = (model, layer)
            if (layer == 0 and b == first) or (layer == self.num_layers[model] - 1 and b == last):
                continue
            x[self.offset[b]] = keep
        return x
