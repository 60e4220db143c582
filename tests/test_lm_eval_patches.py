"""The lm-eval patches: each still matches the lm-eval it was written against, and does what it says."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging

import lm_eval
import lm_eval.api.task as lm_task
import lm_eval.utils as lm_utils
import pytest
from lm_eval.models.huggingface import HFLM

from evomerge.objectives import lm_eval_patches as P

TARGETS = [(p.name, target, digest) for p in P.PATCHES for target, digest in p.targets.items()]


def resolve(target: str):  # noqa: ANN201
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj)  # the original, also once a patch has replaced it


@pytest.mark.parametrize(("patch", "target", "digest"), TARGETS, ids=[f"{p}-{t}" for p, t, _ in TARGETS])
def test_patched_functions_are_unchanged(patch: str, target: str, digest: str) -> None:
    got = hashlib.sha256(inspect.getsource(resolve(target)).encode()).hexdigest()
    assert got == digest, (
        f"lm-eval {lm_eval.__version__} changed {target} (patch '{patch}' was written against lm-eval "
        f"{P.LM_EVAL_VERSION}): check that the patch still holds, then update its hash"
    )


def test_apply_is_idempotent_and_patches() -> None:
    P.apply()
    cached = lm_utils.apply_template
    P.apply()
    assert lm_utils.apply_template is cached and getattr(cached, "_evomerge_cached", False)
    original = inspect.unwrap(cached)
    assert original is not cached
    doc = {"q": "lower A", "n": 3}
    for template in ("{{q}}!", "{{ n + 1 }} {{q|lower}}", "x{{q}}\n"):
        assert cached(template, doc) == original(template, doc)
    assert isinstance(lm_task.tqdm, functools.partial) and lm_task.tqdm.keywords == {"disable": True}
    filters = [f for f in logging.getLogger("lm_eval.models.huggingface").filters if isinstance(f, P._MessageFilter)]
    assert len(filters) == 1


def test_filtered_warnings_are_lm_eval_texts() -> None:
    source = inspect.getsource(HFLM.__init__) + inspect.getsource(HFLM._get_backend)
    for text in P.HFLM_MODEL_WARNINGS:
        assert text in source, f"lm-eval no longer warns {text!r}: drop or update the filter"
    record = logging.LogRecord("lm_eval.models.huggingface", logging.WARNING, "", 0, P.HFLM_MODEL_WARNINGS[0], (), None)
    assert not P._MessageFilter(P.HFLM_MODEL_WARNINGS).filter(record)


@pytest.mark.parametrize("method", ["generate_until", "loglikelihood", "loglikelihood_rolling"])
def test_quiet_hflm_forces_disable_tqdm(method: str) -> None:
    assert "disable_tqdm" in inspect.signature(getattr(HFLM, method)).parameters
    quiet = P.hflm_class(quiet=True)
    assert issubclass(quiet, HFLM) and P.hflm_class(quiet=False) is HFLM
    seen = {}

    def record(self, requests, disable_tqdm=False):  # noqa: ANN001, ANN202
        seen["disable_tqdm"] = disable_tqdm
        return []

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HFLM, method, record)
        getattr(quiet, method)(object.__new__(quiet), [])
    assert seen == {"disable_tqdm": True}
