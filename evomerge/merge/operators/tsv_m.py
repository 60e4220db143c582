"""TSV-M: task singular vectors, orthogonalised, then summed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.merge._torch import torch
from evomerge.merge.operators import OperatorSpec, register
from evomerge.merge.operators._common import _bcast, _finish, _prep

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["tsv_m"]


def _orthogonalise(m: Tensor) -> Tensor:
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def tsv_m(
    base, deltas, weights, densities=None, *, fraction: float | None = None, alpha: float = 1.0, workspace=None, **_
) -> Tensor:
    """TSV-Merge (Gargiulo et al. 2025, task singular vectors), per 2-D tensor.

    Each weighted task vector ``w_t tau_t = U_t S_t V_t^T`` keeps its top ``fraction`` of singular
    components (default 1/K, the paper's choice; at least one); the kept ``U``'s are concatenated and
    orthogonalised (``U = P S Q^T -> P Q^T``), the ``V``'s likewise, and the merged task vector is
    ``U_perp diag(S) V_perp^T``, scaled by ``alpha``. Other tensors (norms, biases) average the
    weighted task vectors, as the reference code does.
    """
    b, d, w, _ = _prep(base, deltas, weights, None)
    k = d.shape[0]
    if k == 0:
        return base.clone()
    wd = d * _bcast(w, d)
    if b.dim() == 2 and min(b.shape) > 0:
        r_all = min(b.shape)
        frac = (1.0 / k) if fraction is None else float(fraction)
        r = max(1, min(r_all, int(frac * r_all)))
        us, ss, vs = [], [], []
        for i in range(k):
            u, s, vh = torch.linalg.svd(wd[i], full_matrices=False)
            us.append(u[:, :r])
            ss.append(s[:r])
            vs.append(vh[:r].t())
        U, S, V = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
        merged = (_orthogonalise(U) * S) @ _orthogonalise(V).t()
    else:
        merged = wd.mean(0)
    out = b + float(alpha) * merged
    return _finish(out, base, None)


register(
    OperatorSpec(
        "tsv_m",
        tsv_m,
        ("weight",),
        {"fraction": None, "alpha": 1.0},
        context=frozenset({"whole"}),
        description="task singular vectors, orthogonalised",
    ),
    "tsv",
)

