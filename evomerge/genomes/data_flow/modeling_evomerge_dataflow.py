"""A data-flow merged model found by evomerge: Llama blocks of several models run along a layer path.

This file ships inside every folder ``evomerge export`` writes for a data-flow candidate and is loaded
by ``transformers`` as remote code::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(folder)

``trust_remote_code=True`` is needed because the architecture is not part of ``transformers``: it runs
this file (which imports only ``torch`` and ``transformers``; read it before trusting it). Without the
flag loading fails (model type ``evomerge_dataflow`` is unknown) rather than silently building a
plain Llama.

The model: the embeddings, then for each step ``i`` of ``config.dfs_path`` the hidden state is
multiplied by ``config.dfs_scales[i]`` and fed to decoder block ``blocks[config.dfs_path[i]]``, then
the final norm and the LM head. ``blocks`` holds each distinct source block once, even when the path
runs it several times (``config.dfs_blocks[b]`` names block ``b``'s origin: model index and layer
index in ``config.dfs_models``). Every step has its own KV-cache slot (``num_hidden_layers`` equals
the path length), so generation with a cache works even when a block repeats.

evomerge uses this same file for its in-memory candidates (with the blocks shared with the resident
source models, not copied), so the exported model computes exactly what the search evaluated.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)


class DataFlowConfig(LlamaConfig):
    """A Llama config plus the layer path. ``num_hidden_layers`` is the number of path steps."""

    model_type = "evomerge_dataflow"

    # Origin of each stored block: [model index, layer index] into dfs_models.
    dfs_blocks: list | None = None
    # One stored-block index per step, in execution order.
    dfs_path: list | None = None
    # One input scale per step.
    dfs_scales: list | None = None
    # The source model references (provenance only; nothing is loaded from them).
    dfs_models: list | None = None


class _StepCache:
    """The cache as one path step sees it: every write goes to that step's own slot.

    A block that runs at several steps keeps its original ``layer_idx``; this view re-indexes its
    cache writes by step, so repeated blocks never overwrite each other's keys and values.
    """

    __slots__ = ("cache", "slot")

    def __init__(self, cache: Cache, slot: int) -> None:
        self.cache = cache
        self.slot = slot

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.slot, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


class DataFlowPreTrainedModel(LlamaPreTrainedModel):
    config_class = DataFlowConfig
    config: DataFlowConfig
    _no_split_modules = ["LlamaDecoderLayer"]
    _can_compile_fullgraph = False


class DataFlowModel(DataFlowPreTrainedModel):
    def __init__(self, config: DataFlowConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        n_blocks = len(config.dfs_blocks or [])
        self.blocks = nn.ModuleList([LlamaDecoderLayer(config, b) for b in range(n_blocks)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        for k in ("output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(k, None)
        if use_cache is None:
            use_cache = self.config.use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        path = self.config.dfs_path or []
        scales = self.config.dfs_scales or [1.0] * len(path)
        for step, (b, scale) in enumerate(zip(path, scales, strict=True)):
            if scale != 1.0:
                hidden_states = hidden_states * scale
            hidden_states = self.blocks[b](
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=None if past_key_values is None else _StepCache(past_key_values, step),
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class DataFlowForCausalLM(DataFlowPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DataFlowConfig):
        super().__init__(config)
        self.model = DataFlowModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)
        if return_dict is False:
            return out.to_tuple()
        return out


__all__ = ["DataFlowConfig", "DataFlowForCausalLM", "DataFlowModel", "DataFlowPreTrainedModel"]
