"""Tiny random Llama families for merge tests (no hub access needed).

``make_tiny_llama_family`` saves a base model and ``n_experts`` experts (base + small random
perturbation) as Hugging Face folders with safetensors, and returns their paths. Other test modules may
import it.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(
    *,
    vocab_size: int = 64,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = True,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )


def placeholder_tasks(folder: str | Path, names: tuple[str, ...]) -> Path:
    """``folder/tasks`` with a task file for each name: what a space needs to validate when the workers
    that evaluate it are fakes (they never read a task)."""
    d = Path(folder) / "tasks"
    d.mkdir(parents=True, exist_ok=True)
    for t in names:
        (d / f"{t}.yaml").write_text(f"task: {t}\n")
    return d


def make_tiny_llama_family(
    tmp_path: str | Path,
    n_experts: int = 2,
    seed: int = 0,
    *,
    scale: float = 0.02,
    tie_word_embeddings: bool = True,
    **config_kwargs,
) -> tuple[str, list[str]]:
    """Save a tiny random Llama base and ``n_experts`` perturbed copies; return (base, [experts]).

    Each expert is the base plus Gaussian noise of standard deviation ``scale`` on every tensor, so
    task vectors are dense, have mixed signs, and the experts disagree (what TIES is about).
    """
    from transformers import LlamaForCausalLM

    root = Path(tmp_path)
    cfg = tiny_llama_config(tie_word_embeddings=tie_word_embeddings, **config_kwargs)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).eval()
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed + 1)
    experts = []
    for i in range(n_experts):
        m = LlamaForCausalLM(cfg).eval()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        d = root / f"expert{i}"
        m.save_pretrained(d)
        experts.append(str(d))
    return str(base_dir), experts
