"""In-memory data-flow candidates: the source models' blocks resident once, shared by every candidate.

>>> mat = DataFlowMaterializer([path_a, path_b])     # loads the models once (eval mode, no grad)
>>> model = mat.new_model()                          # a transformers PreTrainedModel + GenerationMixin
>>> mat.apply(recipe, model)                         # re-wires the path in place: no weight is copied
>>> model(input_ids).logits; model.generate(...)     # works under lm-eval's HFLM

The candidate is :class:`~evomerge.genomes.data_flow.modeling_evomerge_dataflow.DataFlowForCausalLM`, the very
class an exported folder loads with ``trust_remote_code``; in memory its ``model.blocks`` are the
source models' own decoder-layer modules (shared, not copied), its embeddings / rotary embedding
come from the embed source and its final norm / LM head from the head source. Each path step gets
its own KV-cache slot, so ``generate()`` with a cache works when a block repeats.

The cost measures of a candidate (``path_length``, ``path_params``, ``params``) are in
:mod:`evomerge.genomes.data_flow.costs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from evomerge.genomes.data_flow.modeling_evomerge_dataflow import DataFlowConfig, DataFlowForCausalLM
from evomerge.genomes.data_flow.recipe import DataFlowRecipe
from evomerge.genomes.data_flow.sources import resolve_source
from evomerge.genomes.data_flow.spec import ARCH_KEYS, SUPPORTED_MODEL_TYPES


class DataFlowError(ValueError):
    """A source or recipe a data-flow candidate cannot be built from."""


def _arch(cfg) -> dict:
    out = {}
    for k in ARCH_KEYS:
        v = getattr(cfg, k, None)
        if k == "head_dim" and v is None:
            v = cfg.hidden_size // cfg.num_attention_heads
        if k == "num_key_value_heads" and v is None:
            v = cfg.num_attention_heads
        out[k] = v
    return out


class DataFlowMaterializer:
    """Holds the source models resident; wires any :class:`DataFlowRecipe` into a candidate in place.

    ``model_paths``: local Hugging Face folders (or hub ids), in the order of ``DataFlowRecipe.models``
    (use :meth:`from_refs` for recipe references: zoo://, PS recipe JSON, exported folders).
    ``embed_source``: the model whose embeddings (and tokenizer) :meth:`new_model` starts from.
    Same shape as :class:`evomerge.merge.Materializer`: ``new_model()``, ``apply(recipe, model)``,
    ``param_count(recipe)``; :func:`evomerge.genomes.data_flow.export.save_dataflow` writes a candidate.
    """

    def __init__(
        self,
        model_paths: Sequence[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        embed_source: int = 0,
        attn_implementation: str = "sdpa",
        refs: Sequence[str] | None = None,
    ) -> None:
        if not model_paths:
            raise DataFlowError("a data-flow candidate needs at least one source model")
        self.model_paths = [str(p) for p in model_paths]
        self.refs = [str(r) for r in refs] if refs is not None else list(self.model_paths)
        self.device = torch.device(device)
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.embed_source = int(embed_source)
        configs = [AutoConfig.from_pretrained(p) for p in self.model_paths]
        for p, c in zip(self.model_paths, configs, strict=True):
            if c.model_type not in SUPPORTED_MODEL_TYPES:
                raise DataFlowError(
                    f"{p}: model type {c.model_type!r}; data-flow merging supports {', '.join(SUPPORTED_MODEL_TYPES)}"
                )
        ref_arch = _arch(configs[0])
        for p, c in zip(self.model_paths[1:], configs[1:], strict=True):
            a = _arch(c)
            diff = [k for k in ARCH_KEYS if a[k] != ref_arch[k]]
            if diff:
                raise DataFlowError(
                    f"{p} differs from {self.model_paths[0]} in {', '.join(diff)}; a layer path needs one architecture"
                )
        self.sources = []
        for p in self.model_paths:
            m = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, attn_implementation=attn_implementation)
            m.to(self.device)
            m.eval()
            m.requires_grad_(False)
            self.sources.append(m)
        self.configs = [m.config for m in self.sources]
        self.num_layers = [len(m.model.layers) for m in self.sources]

    @classmethod
    def from_refs(cls, refs: Sequence[str], device="cpu", dtype=torch.float32, **kw) -> DataFlowMaterializer:
        """From recipe references: zoo://NAME, folders, hub ids, exported PS folders, PS recipe JSON."""
        return cls([resolve_source(r) for r in refs], device, dtype, refs=refs, **kw)

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    def tokenizer_path(self, source: int | None = None) -> str:
        """Folder of the tokenizer candidates use (the embed source's)."""
        return self.model_paths[self.embed_source if source is None else source]

    # -- candidates ------------------------------------------------------------------------------

    def _config(self, recipe: DataFlowRecipe | None) -> DataFlowConfig:
        e = recipe.embed_source if recipe is not None else self.embed_source
        h = recipe.head_source if recipe is not None else e
        d = self.configs[e].to_dict()
        for k in ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype"):
            d.pop(k, None)
        src_tied = bool(getattr(self.configs[h], "tie_word_embeddings", False))
        d["tie_word_embeddings"] = src_tied and e == h
        if recipe is None:
            d.update(num_hidden_layers=0, dfs_blocks=[], dfs_path=[], dfs_scales=[], dfs_models=list(self.refs))
        else:
            blocks = recipe.unique_blocks()
            index = {b: i for i, b in enumerate(blocks)}
            d.update(
                num_hidden_layers=len(recipe.path),
                dfs_blocks=[list(b) for b in blocks],
                dfs_path=[index[tuple(s)] for s in recipe.path],
                dfs_scales=[float(s) for s in recipe.scales],
                dfs_models=list(recipe.models),
            )
        cfg = DataFlowConfig(**d)
        cfg._attn_implementation = self.attn_implementation
        cfg.architectures = ["DataFlowForCausalLM"]
        return cfg

    def new_model(self, recipe: DataFlowRecipe | None = None) -> DataFlowForCausalLM:
        """A candidate on the device in eval mode: the embed source with an empty path (or ``recipe``)."""
        with no_init_weights(), torch.device("meta"):
            model = DataFlowForCausalLM(self._config(None))
        model.eval()
        model.requires_grad_(False)
        src = self.sources[self.embed_source]
        gen = getattr(src, "generation_config", None)
        if gen is not None:
            model.generation_config = gen.__class__.from_dict(gen.to_dict())
        self._wire(model, self.embed_source, self.embed_source, [])
        if recipe is not None:
            self.apply(recipe, model)
        return model

    def _check(self, recipe: DataFlowRecipe) -> None:
        if len(recipe.models) != self.n_sources:
            raise DataFlowError(f"recipe has {len(recipe.models)} models, the materializer {self.n_sources}")
        if list(recipe.num_layers) != self.num_layers:
            raise DataFlowError(f"recipe block counts {recipe.num_layers} differ from the models' {self.num_layers}")

    def _wire(self, model: DataFlowForCausalLM, e: int, h: int, blocks: list[tuple[int, int]]) -> None:
        se, sh = self.sources[e], self.sources[h]
        inner = model.model
        inner.embed_tokens = se.model.embed_tokens
        inner.rotary_emb = se.model.rotary_emb
        inner.norm = sh.model.norm
        model.lm_head = sh.lm_head
        inner.blocks = torch.nn.ModuleList([self.sources[m].model.layers[layer] for m, layer in blocks])

    @torch.no_grad()
    def apply(self, recipe: DataFlowRecipe, model: DataFlowForCausalLM) -> None:
        """Re-wire ``model`` to run ``recipe``'s path (shared modules, no weight copy, no reallocation)."""
        self._check(recipe)
        cfg = self._config(recipe)
        blocks = [tuple(b) for b in cfg.dfs_blocks]
        self._wire(model, recipe.embed_source, recipe.head_source, blocks)  # type: ignore[arg-type]
        # Update the config object in place: HFLM and generate() hold a reference to it.
        for k in (
            "num_hidden_layers",
            "dfs_blocks",
            "dfs_path",
            "dfs_scales",
            "dfs_models",
            "tie_word_embeddings",
            "vocab_size",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        ):
            setattr(model.config, k, getattr(cfg, k))
        model.model.config = model.config

    def param_count(self, recipe: DataFlowRecipe) -> int:
        """Parameters a candidate of ``recipe`` uses (shared tensors once); see :func:`path_params`."""
        self._check(recipe)
        seen: set[int] = set()
        total = 0
        mods = [
            self.sources[recipe.embed_source].model.embed_tokens,
            self.sources[recipe.head_source].model.norm,
            self.sources[recipe.head_source].lm_head,
            *(self.sources[m].model.layers[layer] for m, layer in recipe.unique_blocks()),
        ]
        for mod in mods:
            for p in mod.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total

