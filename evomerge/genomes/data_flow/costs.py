"""Cost measures of an in-memory data-flow candidate, for ``cost`` objectives.

``path_length``: steps of the path (a latency proxy); ``path_params``: parameters the candidate uses,
each shared tensor once (embeddings, the distinct blocks of the path, final norm, head: the exported
model's size); ``params``: the non-zero entries of those same tensors.
"""

from __future__ import annotations

from typing import Any


def path_length(model: Any) -> int:
    """Steps of the candidate's path (a repeated block counts once per step): a latency proxy."""
    return len(model.config.dfs_path or [])


def path_params(model: Any) -> int:
    """Parameters the candidate holds, each shared tensor once (the exported model's size)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
