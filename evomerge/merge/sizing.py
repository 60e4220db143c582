"""The memory a worker needs for a base and K sources, from tensor shapes alone (no weights read).

The figures follow the materializer's own accounting, so a node can be sized before a model is
downloaded: ``resident`` is what :meth:`Materializer.resident_bytes
<evomerge.merge.Materializer.resident_bytes>` reports once the method's indexes are built (the base, the
K task vectors in the materializer's dtype, the magnitude index of magnitude trims, DELLA's rank tables,
Fisher), ``model`` is :meth:`~evomerge.merge.Materializer.model_bytes` (the one preallocated model each
candidate is written into), and ``scratch`` is the executor's reusable float32 buffers of one chunk for
the method's eager streamed path. Magnitude-index quantiles live in host memory; everything else lives
on the worker's device. lm-eval's own activations and KV cache come on top (see ``workers/SIZING.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

import torch

from evomerge.merge.execute import DEFAULT_CHUNK_ACCEL
from evomerge.merge.operators import get_operator, resolve_params
from evomerge.merge.resident import DELLA_BINS

# Float32 chunk buffers the eager streamed merge keeps in its workspace, per method, as a function of K
# (read off the executor's Workspace after a candidate; tests/test_sizing.py checks them).
SCRATCH_BUFFERS = {
    "linear": lambda k: 1,
    "task_arithmetic": lambda k: 1,
    "dare": lambda k: 2 * k + 1,
    "dare_ties": lambda k: 3 * k + 1,
    "ties": lambda k: 3 * k + 3,
    "della": lambda k: k,
}
_SCRATCH_OTHER = SCRATCH_BUFFERS["ties"]  # the most seen; for methods not measured


@dataclass(frozen=True)
class WorkerMemory:
    """Bytes a worker holds (see the module's text)."""

    base: int
    deltas: int
    index_device: int
    index_host: int
    fisher: int
    model: int
    scratch: int

    @property
    def resident(self) -> int:
        """What ``Materializer.resident_bytes()`` reports."""
        return self.base + self.deltas + self.index_device + self.index_host + self.fisher

    @property
    def device(self) -> int:
        """On the worker's device (the GPU): all but the host-side quantile index."""
        return self.resident - self.index_host + self.model + self.scratch

    @property
    def host(self) -> int:
        return self.index_host


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def checkpoint_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The float tensors of a checkpoint of a transformers ``config`` (tied tensors once), by name, from a
    model built on the meta device: no memory, no weights."""
    from transformers import AutoModelForCausalLM  # seconds to import: only sizing from a config needs it

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # named_parameters lists a tied tensor once, under the name the checkpoint keeps (the embedding)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    persistent = model.state_dict().keys()
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in persistent and b.is_floating_point()})
    return shapes


def worker_memory(
    shapes: Mapping[str, tuple[int, ...]],
    k: int,
    dtype: torch.dtype,
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    trim_index: str = "quantile",
    quantile_points: int = 4097,
    chunk: int = DEFAULT_CHUNK_ACCEL,
) -> WorkerMemory:
    """A worker's memory for a base with these float tensors and ``k`` sources, merged with ``method``.

    ``trim_index``, ``quantile_points`` and ``chunk`` as the :class:`~evomerge.merge.Materializer` takes
    them (``chunk`` defaults to a GPU's)."""
    if k < 1:
        raise ValueError(f"a merge needs at least one source, got {k}")
    spec = get_operator(method)
    sparsify, context = spec.resolved(resolve_params(spec, dict(params or {})))
    es = element_size(dtype)
    sizes = [prod(s) for s in shapes.values()]
    model = sum(sizes) * es
    index_device = index_host = 0
    if sparsify in ("magnitude", "outliers") and trim_index != "none":
        for n in sizes:
            if trim_index == "quantile" and n > quantile_points:
                index_host += k * quantile_points * 4  # float32 quantiles, kept on the host
            else:
                index_device += k * n * es
    if sparsify == "della":
        index_device += len(sizes) * k * DELLA_BINS * 4
    fisher = k * model if "fisher" in context else 0
    scratch = SCRATCH_BUFFERS.get(spec.name, _SCRATCH_OTHER)(k) * min(chunk, max(sizes, default=0)) * 4
    return WorkerMemory(base=model, deltas=k * model, index_device=index_device, index_host=index_host,
                        fisher=fisher, model=model, scratch=scratch)
