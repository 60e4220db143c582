"""Model Breadcrumbs: drop the largest (outliers) and smallest |tau|, then task arithmetic or TIES."""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.merge._torch import torch
from evomerge.merge.operators import REQUIRED, OperatorSpec, register
from evomerge.merge.operators._common import (
    _band_mask,
    _bcast,
    _finish,
    _prep,
    _ta_combine,
    _ties_combine,
    breadcrumb_thresholds,
)

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["breadcrumbs", "breadcrumbs_ties"]


def breadcrumbs(
    base, deltas, weights, densities=None, *, thresholds=None, workspace=None, normalize=False, gamma=0.01, **params
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023) as mergekit 0.1.5's ``breadcrumbs``.

    Per tensor and source, drop the ``gamma`` fraction of largest |tau| (outliers) and then the smallest,
    so that ``density`` of the entries remain (see :func:`breadcrumb_thresholds`), then task arithmetic
    (``normalize`` false, ``lambda``), no rescale. ``gamma`` is method-wide here (mergekit allows it per
    model); a band is selected by two thresholds, so exact ties of |tau| at a band edge are all kept.
    """
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0]:
        if thresholds is None:
            thresholds = breadcrumb_thresholds(d, dens, float(gamma))
        d = _band_mask(d, thresholds, torch.empty_like(d)).mul_(d)
    out = _ta_combine(b, d, w, bool(normalize), float(params.get("lambda", 1.0)))
    return _finish(out, base, None)


def breadcrumbs_ties(
    base, deltas, weights, densities=None, *, thresholds=None, workspace=None, normalize=False, gamma=0.01, **params
) -> Tensor:
    """Breadcrumbs sparsification, then TIES sign election and disjoint merge (mergekit's
    ``breadcrumbs_ties``; default ``normalize: false`` as mergekit)."""
    b, d, w, dens = _prep(base, deltas, weights, densities)
    if d.shape[0] == 0:
        return base.clone()
    if thresholds is None:
        thresholds = breadcrumb_thresholds(d, dens, float(gamma))
    wd = _band_mask(d, thresholds, torch.empty_like(d)).mul_(d).mul_(_bcast(w, d))
    out = _ties_combine(b, wd, w, bool(normalize), float(params.get("lambda", 1.0)), None)
    return _finish(out, base, None)


for _name, _fn, _what in (
    ("breadcrumbs", breadcrumbs, "task arithmetic"),
    ("breadcrumbs_ties", breadcrumbs_ties, "TIES election and merge"),
):

    register(
        OperatorSpec(
            _name,
            _fn,
            ("weight", "density"),
            {"lambda": 1.0, "normalize": False, "gamma": 0.01},
            sparsify="outliers",
            mergekit_method=_name,
            mergekit_defaults={"normalize": False, "rescale": False, "lambda": 1.0},
            # mergekit's gamma is per model: evomerge takes one for all of them
            mergekit_inputs={"weight": ("weight", REQUIRED), "density": ("density", 1.0), "gamma": ("gamma", 0.01)},
            description=f"drop largest gamma and smallest |tau|, {_what}",
        )
    )
