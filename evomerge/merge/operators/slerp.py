"""SLERP: spherical interpolation of two models, with its linear form for streaming."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from evomerge.merge._torch import torch
from evomerge.merge.operators import REQUIRED, OperatorSpec, register
from evomerge.merge.operators._common import _finish, _prep

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["slerp", "slerp_stats", "slerp_linear"]


def _slerp_pair(a: Tensor, c: Tensor, t: float, per_row: bool, dot_threshold: float, eps: float) -> Tensor:
    shape = a.shape
    if per_row and a.dim() >= 1:
        A, C = a.reshape(shape[0], -1), c.reshape(shape[0], -1)
    else:
        A, C = a.reshape(1, -1), c.reshape(1, -1)
    if A.shape[1] == 0:
        return a.clone()
    na = torch.linalg.vector_norm(A, dim=1, keepdim=True)
    nc = torch.linalg.vector_norm(C, dim=1, keepdim=True)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nc = torch.where(nc > eps, nc, torch.ones_like(nc))
    dot = ((A / na) * (C / nc)).sum(dim=1, keepdim=True).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, torch.zeros_like(dot), dot))
    st = torch.sin(theta)
    st = torch.where(lin, torch.ones_like(st), st)
    ca = torch.where(lin, torch.full_like(dot, 1 - t), torch.sin((1 - t) * theta) / st)
    cc = torch.where(lin, torch.full_like(dot, t), torch.sin(t * theta) / st)
    return (ca * A + cc * C).reshape(shape)


def slerp(
    base,
    deltas,
    weights=None,
    densities=None,
    *,
    t: float = 0.5,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    per_row: bool = False,
    workspace=None,
    **_: Any,
) -> Tensor:
    """Spherical interpolation of two models: ``t = 0`` gives the first, ``t = 1`` the second.

    With one source the two models are the base (t = 0) and the source (t = 1), as mergekit's
    ``slerp`` with ``base_model`` and one other model; with two sources they are source 0 and source 1
    (the base is only the origin of the task vectors). Weights and densities are not used; ``t`` is the
    gene (a layer group may override it).

    Convention: as mergekit 0.1.5 (whose kernel's leading axis is a batch of whole tensors, checked
    tensor by tensor in the parity tests), the angle is that of the two whole flattened tensors;
    ``per_row: true`` takes one angle per row of the leading (output) axis instead. When the normalised
    dot product exceeds ``dot_threshold`` in magnitude (nearly colinear or antipodal) it falls back to
    linear interpolation. Endpoints are returned exactly (t = 0 and t = 1 return the end models).
    """
    b, d, _, _ = _prep(base, deltas, None, None)
    k = d.shape[0]
    if k == 1:
        a, c = b, b + d[0]
    elif k == 2:
        a, c = b + d[0], b + d[1]
    else:
        raise ValueError(f"slerp interpolates two models (the base and one source, or two sources), got {k} sources")
    t = float(t)
    if t == 0:
        out = a
    elif t == 1:
        out = c
    else:
        out = _slerp_pair(a, c, t, bool(per_row), float(dot_threshold), float(eps))
    return _finish(out, base, None)


def slerp_stats(base: Tensor, deltas: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``[|a|, |c|, <a, c>]`` (float64) of SLERP's two end models of one tensor (see :func:`slerp`).

    They do not depend on ``t``, so a materializer computes them once per tensor and each candidate is
    then a linear combination (:func:`slerp_linear`) at the cost of task arithmetic. Accumulated in
    float64 over float32 chunks, so the temporaries stay ``chunk`` entries large.
    """
    k = deltas.shape[0]
    if k not in (1, 2):
        raise ValueError(f"slerp interpolates two models, got {k} sources")
    b = base.reshape(-1)
    d = deltas.reshape(k, -1)
    acc = torch.zeros(3, dtype=torch.float64)
    for s in range(0, b.numel(), chunk):
        bb = b[s : s + chunk].float()
        a = bb + d[0, s : s + chunk].float() if k == 2 else bb
        c = bb + d[k - 1, s : s + chunk].float()
        acc[0] += float(torch.dot(a, a))
        acc[1] += float(torch.dot(c, c))
        acc[2] += float(torch.dot(a, c))
    return torch.stack([acc[0].sqrt(), acc[1].sqrt(), acc[2]])


def slerp_linear(
    stats: Tensor, k: int, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, list[float]]:
    """SLERP of one whole tensor as ``bscale * base + sum_i coef_i * tau_i`` from :func:`slerp_stats`.

    ``slerp(a, c) = ca a + cc c`` with scalar ``ca, cc`` (whole-tensor angle), and ``a, c`` are the base
    or ``base + tau_i``, so the result is linear in the base and the task vectors. Same conventions as
    :func:`slerp` (norms under ``eps`` count as 1, the linear fallback above ``dot_threshold``, exact
    end points).
    """
    t = float(t)
    if t == 0:
        ca, cc = 1.0, 0.0
    elif t == 1:
        ca, cc = 0.0, 1.0
    else:
        na, nc, dot = (float(x) for x in stats)
        na = na if na > eps else 1.0
        nc = nc if nc > eps else 1.0
        cos = max(-1.0, min(1.0, dot / (na * nc)))
        if abs(cos) > dot_threshold:
            ca, cc = 1 - t, t
        else:
            theta = math.acos(cos)
            st = math.sin(theta)
            ca, cc = math.sin((1 - t) * theta) / st, math.sin(t * theta) / st
    if k == 1:  # a = base, c = base + tau_0
        return ca + cc, [cc]
    return ca + cc, [ca, cc]  # a = base + tau_0, c = base + tau_1


register(
    OperatorSpec(
        "slerp",
        slerp,
        (),
        {"t": 0.5, "dot_threshold": 0.9995, "eps": 1e-8, "per_row": False},
        group_params=("t",),
        param_bounds={"t": (0.0, 1.0)},
        context=frozenset({"whole"}),
        min_sources=1,
        max_sources=2,
        stats=slerp_stats,
        linear=lambda stats, k, t=0.5, dot_threshold=0.9995, eps=1e-8, per_row=False, **_: (
            None if per_row else slerp_linear(stats, k, t, dot_threshold, eps)
        ),
        mergekit_method="slerp",
        mergekit_defaults={"t": REQUIRED},
        # mergekit's kernel: whole-tensor angle at these thresholds; its base and one other model (two
        # sources export with the first as mergekit's base: the base is then only the origin)
        mergekit_fixed={"dot_threshold": 0.9995, "eps": 1e-8, "per_row": False},
        mergekit_models=1,
        description="spherical interpolation of two models",
    )
)

