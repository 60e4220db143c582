"""Pinned CPU numerics for building the demo zoo, so the same recipe gives the same weights on every
x86-64 machine with AVX2. With these settings alone (zoo v2) that held on Intel machines only (three built
the same bits: ``REFERENCE_SHA256`` in :mod:`evomerge.zoo`): MKL honours a reproducibility branch other than
AUTO or COMPATIBLE only on Intel processors and elsewhere falls back to AUTO, and AMD machines built other
weights; COMPATIBLE did not give one vendor's bits on the other either (docs/benchmarks.md). So zoo v3 also
computes every matrix product exactly (:mod:`evomerge.zoo.exact`), leaving no BLAS order in the weights;
these settings still pin torch's own kernels, whose order is the same on any CPU with one code path.

Training the zoo runs thousands of optimizer steps, and the float reduction order of torch's vector
kernels and of MKL's matrix products depends on the instruction set the CPU offers (AVX2 or AVX-512):
one machine's build differed from another's after 60 steps, and the demo's cross task sits on a sharp
threshold of training, so a different build scored 0.03 on cross where the recipe was made to score
0.2. These settings make torch's kernels, MKL (conditional numerical reproducibility, strict) and
oneDNN use their AVX2 code paths on one thread. They are read when torch loads, so a build runs in a
fresh interpreter with them set (``evomerge.zoo.build``). ARM machines and x86 without AVX2 build other
weights; ``zoo.json`` records the capability a build ran with and each model's weights digest.
"""

from __future__ import annotations

import os

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# Part of the zoo fingerprint from version 2 on: a build made before the pin is another build.
TAG = "x86-avx2-strict-1thread"


def pinned_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the pinned settings."""
    env = dict(os.environ if base is None else base)
    env.update(PINNED_ENV)
    return env


def is_pinned() -> bool:
    return all(os.environ.get(k) == v for k, v in PINNED_ENV.items())
