"""Diagonal empirical Fisher information of source models, for the ``fisher`` operator."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["fisher_key", "source_fisher"]


def fisher_key(texts: list[str] | list[list[int]], max_length: int) -> str:
    """What identifies a Fisher computation besides the model: the texts and the truncation."""
    return hashlib.sha256(json.dumps([texts, max_length], sort_keys=True).encode()).hexdigest()[:16]


def source_fisher(
    path: str,
    texts: list[str] | list[list[int]],
    *,
    device: torch.device,
    max_length: int = 256,
    cache_dir: str | Path | None = None,
    tokenizer: Any = None,
) -> dict[str, Tensor]:
    """``F = mean over texts of (d loss / d theta)^2`` of model ``path`` (float32, on the CPU).

    Each text (a string, tokenized with the model's own tokenizer or ``tokenizer``, or a list of token
    ids) is one example, with the causal LM loss of the text. With ``cache_dir`` the result is saved
    there (safetensors, keyed by the model path, the texts and ``max_length``) and reused.
    """
    # transformers costs seconds to import: only a Fisher merge needs it here
    from transformers import AutoModelForCausalLM

    cfile = None
    if cache_dir is not None:
        h = hashlib.sha256(f"{Path(path).resolve()}\x00{fisher_key(texts, max_length)}".encode()).hexdigest()[:16]
        cfile = Path(cache_dir) / f"fisher-{h}.safetensors"
        if cfile.is_file():
            return load_file(str(cfile))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()
    tok = tokenizer
    if tok is None and any(isinstance(t, str) for t in texts):
        from transformers import AutoTokenizer  # (as above)

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
        ids = ids.to(device)
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
    return fis
