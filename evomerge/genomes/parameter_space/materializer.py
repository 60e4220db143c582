"""A worker's parameter-space materializer: base and task vectors resident, merged by fused, C or eager kernels."""

from __future__ import annotations

from typing import Any

import torch

from evomerge.genomes.base import Materializing, WorkerSettings
from evomerge.merge import Materializer
from evomerge.zoo import resolve_ref


def _use_fused(setting: str, device) -> tuple[str, str]:
    """How a parameter-space worker on ``device`` merges: "fused" (compiled kernels, and on the CPU the
    C kernels), "native" (the C kernels only: CPU, no compile) or "eager"; and why."""
    if setting == "off":
        return "eager", "fused_kernels: off"
    if setting == "auto" and device.type != "cuda":
        from evomerge.merge import native

        if device.type == "cpu" and native.available():  # built now: the build lands in the start-up time
            return "native", (
                "fused_kernels: auto, on cpu the C kernels (no torch.compile: a CPU compile costs more than "
                "it saves); operators without one run eager"
            )
        return "eager", f"fused_kernels: auto, off on {device.type} (a CPU compile costs more than it saves)"
    from evomerge.merge import kernels

    # Checked now rather than at the first candidate, so the compile lands in the start-up time.
    if not kernels.available(device):
        return "eager", f"fused_kernels: {setting}, but torch.compile does not work here: eager operators"
    return "fused", f"fused_kernels: {setting}" + (f", on for {device.type}" if setting == "auto" else "")


def materializer(cfg: WorkerSettings, device: str, dtype: Any) -> Materializing:
    if cfg.base is None:
        raise ValueError("a parameter-space worker needs a base model")
    kernels, note = _use_fused(cfg.fused, torch.device(device))
    base = resolve_ref(cfg.base)
    mat = Materializer(
        base,
        [resolve_ref(s) for s in cfg.sources],
        device=device,
        dtype=dtype,
        fused=kernels == "fused",
        native=kernels == "native",
    )
    return Materializing(mat, tokenizer_path=base, merge_kernels=kernels, note=note)
