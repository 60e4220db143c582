"""Tokenizer, model config, training and greedy evaluation for the demo zoo (CPU, tiny, seeded)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch.nn.utils import parametrize
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.exact import ExactMatmul
from evomerge.zoo.tasks import Example, alphabet

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]


def make_tokenizer():
    """A character-level fast tokenizer: one token per character, BOS prepended on encode."""
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=64,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return fast


@dataclass(frozen=True)
class ModelSpec:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    max_len: int = 32


def make_model(spec: ModelSpec, vocab_size: int, tok, seed: int):
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_len,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    return model


def _ids(tok, s: str) -> list[int]:
    return tok.convert_tokens_to_ids(list(s))


def encode_batch(tok, examples: Sequence[Example], max_len: int):
    """Right-padded inputs and labels; the loss covers the target, the newline and EOS only."""
    rows, labels = [], []
    for ex in examples:
        p = [tok.bos_token_id] + _ids(tok, ex.prompt)
        t = _ids(tok, ex.target + "\n") + [tok.eos_token_id]
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    n = min(max(len(r) for r in rows), max_len)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (r, l_) in enumerate(zip(rows, labels, strict=True)):
        r, l_ = r[:n], l_[:n]
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(r)] = torch.tensor(l_)
        att[i, : len(r)] = 1
    return ids, att, lab


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    lr: float
    batch: int = 64
    warmup: int = 20
    weight_decay: float = 0.0
    # Parameter-name filter: train only tensors whose name contains one of these (None: all).
    only: tuple[str, ...] | None = None
    # Low-rank fine-tuning: train rank-r adapters on every block linear, merged back into the weights.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    # Per-tensor learning-rate multipliers: (name substring, factor); the first match applies.
    lr_mult: tuple[tuple[str, float], ...] | None = None


class _LoRA(torch.nn.Module):
    def __init__(self, out_f: int, in_f: int, rank: int, alpha: float):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(rank, in_f) / math.sqrt(in_f))
        self.B = torch.nn.Parameter(torch.zeros(out_f, rank))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.B @ self.A) * self.scale


def _add_lora(model, rank: int, alpha: float) -> list:
    mods = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for m in mods:
        parametrize.register_parametrization(m, "weight", _LoRA(*m.weight.shape, rank, alpha))
    return mods


def _drop_lora(mods: list) -> None:
    for m in mods:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def train(
    model,
    tok,
    data: Sequence[Example],
    spec: TrainSpec,
    seed: int,
    max_len: int,
    log: Callable[[str], None] | None = None,
    exact: bool = False,
) -> float:
    """AdamW with linear warm-up and cosine decay over a fixed, seeded data order. Returns last loss.

    ``exact``: every matrix product is :func:`evomerge.zoo.exact.exact_mm` and attention runs eagerly (a
    fused kernel would sum in its own order), so the weights do not depend on the BLAS or the CPU vendor.
    """
    if exact:
        attn, model.config._attn_implementation = model.config._attn_implementation, "eager"
        try:
            with ExactMatmul():
                return train(model, tok, data, spec, seed, max_len, log)
        finally:
            model.config._attn_implementation = attn
    torch.manual_seed(seed)
    rng = random.Random(seed)
    lora = _add_lora(model, spec.lora_rank, spec.lora_alpha) if spec.lora_rank else []
    params = (
        [p for n, p in model.named_parameters() if (".A" in n[-2:] or ".B" in n[-2:]) if lora]
        if lora
        else [p for n, p in model.named_parameters() if spec.only is None or any(s in n for s in spec.only)]
    )
    for _n, p in model.named_parameters():
        p.requires_grad_(any(p is q for q in params))
    if spec.lr_mult and not lora:
        names = {id(p): n for n, p in model.named_parameters()}
        buckets: dict[float, list] = {}
        for p in params:
            f = next((f for sub, f in spec.lr_mult if sub in names[id(p)]), 1.0)
            buckets.setdefault(f, []).append(p)
        groups = [{"params": ps, "lr": spec.lr * f} for f, ps in buckets.items()]
    else:
        groups = [{"params": params, "lr": spec.lr}]
    opt = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        prog = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    order: list[int] = []
    loss_ema = float("nan")
    for step in range(spec.steps):
        if len(order) < spec.batch:
            perm = list(range(len(data)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[: spec.batch], order[spec.batch :]
        ids, att, lab = encode_batch(tok, [data[i] for i in idx], max_len)
        out = model(input_ids=ids, attention_mask=att, labels=lab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        v = out.loss.item()
        loss_ema = v if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * v
        if log and (step + 1) % max(1, spec.steps // 4) == 0:
            log(f"    step {step + 1}/{spec.steps} loss {loss_ema:.3f}")
    if lora:
        with torch.no_grad():
            _drop_lora(lora)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return loss_ema


@torch.no_grad()
def greedy_accuracy(model, tok, examples: Sequence[Example], max_new: int = 8, batch: int = 256) -> float:
    """Exact-match accuracy of greedy generation stopped at the first newline (as the lm-eval YAMLs)."""
    model.eval()
    nl = tok.convert_tokens_to_ids("\n")
    hits = 0
    for s in range(0, len(examples), batch):
        chunk = examples[s : s + batch]
        rows = [[tok.bos_token_id] + _ids(tok, ex.prompt) for ex in chunk]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, n - len(r) :] = torch.tensor(r)
            att[i, n - len(r) :] = 1
        out = []
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        past = None
        cur_ids, cur_pos = ids, pos
        for _ in range(max_new):
            o = model(input_ids=cur_ids, attention_mask=att, position_ids=cur_pos, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = o.logits[:, -1].argmax(-1)
            out.append(nxt)
            att = torch.cat([att, torch.ones((len(rows), 1), dtype=att.dtype)], 1)
            cur_pos = cur_pos[:, -1:] + 1
            cur_ids = nxt[:, None]
        gen = torch.stack(out, 1).tolist()
        for ex, g in zip(chunk, gen, strict=True):
            s_ = ""
            for t in g:
                if t == nl or t == tok.eos_token_id:
                    break
                s_ += tok.convert_ids_to_tokens(t)
            hits += s_ == ex.target
    return hits / max(1, len(examples))
