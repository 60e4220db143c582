"""Every change evomerge makes to lm-eval's behaviour, in one place, applied once per worker process.

lm-eval is run here in-process, many times, on models that live in memory; a few of its habits cost time or
fill the terminal there. Each :class:`Patch` names the lm-eval functions it replaces or relies on, with a
hash of their source in the lm-eval version it was written against: a test compares the hashes with the
installed lm-eval, so an upgrade that changes one of them fails until the patch is checked again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import lm_eval.api.task as lm_task
import lm_eval.utils as lm_utils
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

LM_EVAL_VERSION = "0.4.13"  # the version the hashes below were taken from


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    # "module:qualname" of each lm-eval function the patch replaces or relies on -> sha256 of its source
    targets: dict[str, str]


QUIET_REQUEST_BAR = Patch(
    "quiet_request_bar",
    "Task.build_all_requests wraps the documents in a tqdm bar that has no off switch: the module's tqdm is "
    "replaced by one that is disabled",
    {"lm_eval.api.task:Task.build_all_requests": "9c201589b151532c4d1cd040f87e5e7f6e001e88224fcd96e0a0e0992958c885"},
)
JINJA_CACHE = Patch(
    "jinja_cache",
    "apply_template compiles a task's Jinja prompt again for every document and call (about 1 ms each); "
    "compiled templates are immutable, so memoising the compile step changes nothing else",
    {"lm_eval.utils:apply_template": "5980b059b01a5c1041d475ac8652bf53529dceece28b2432ae98e8a2831d544e"},
)
QUIET_HFLM = Patch(
    "quiet_hflm",
    "HFLM draws a progress bar per request type unless the caller passes disable_tqdm, which lm-eval's "
    "evaluate does not: a subclass forces it",
    {
        "lm_eval.models.huggingface:HFLM.generate_until": (
            "d7a28ec8c421c6c2ce53faa82a9f9b655f4f67c4dff670de4c12dc9773917418"
        ),
        "lm_eval.models.huggingface:HFLM.loglikelihood": (
            "0ecf236f120f72dcbe0c48d68e497dc1fe58b61810921166db601ae3354a6be9"
        ),
        "lm_eval.models.huggingface:HFLM.loglikelihood_rolling": (
            "964cb05a5f1778b535fd22802276036dd623f360f3b6d3058448bf3628f0380a"
        ),
    },
)
QUIET_LOGGING = Patch(
    "quiet_logging",
    "HFLM warns on every model built around an in-memory model, which is what evomerge does on purpose; "
    "those warnings are filtered by their text and lm-eval's and datasets' chatter is held to warnings",
    {
        "lm_eval.models.huggingface:HFLM.__init__": "a82bcfa1b5685cb98c6a819505d3be490e0ca5eb2cebfcf0db84ff7804fd5118",
        "lm_eval.models.huggingface:HFLM._get_backend": (
            "2e8abd728634730c1411a9e4242af63c4fafbab92a9ab55260349a9bda04fede"
        ),
    },
)
PATCHES = (QUIET_REQUEST_BAR, JINJA_CACHE, QUIET_HFLM, QUIET_LOGGING)

NOISY_LOGGERS = ("lm_eval", "lm-eval", "datasets", "fsspec", "filelock", "accelerate")
# What HFLM warns about models passed in memory (the texts occur in HFLM.__init__ and HFLM._get_backend).
HFLM_MODEL_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    # Data-flow candidates have their own model type, which lm-eval does not know to be causal.
    "HF model type is neither marked as CausalLM or Seq2SeqLM",
)


def apply(quiet: bool = True) -> None:
    """Apply the patches to this process (idempotent); ``quiet=False`` keeps lm-eval's bars and logs."""
    _cache_jinja_templates()
    if quiet:
        _quiet_logging()
        _silence_request_building_bar()


def hflm_class(quiet: bool = True) -> type[HFLM]:
    """The HFLM class to build lm-eval models with: one that draws no progress bars when ``quiet``."""
    return _QuietHFLM if quiet else HFLM


class _MessageFilter(logging.Filter):
    def __init__(self, texts: Sequence[str]) -> None:
        super().__init__()
        self.texts = tuple(texts)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
            return not any(t in msg for t in self.texts)
        except Exception:  # noqa: BLE001 - a bad record must not break evaluation
            return True


def _quiet_logging() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _MessageFilter) for f in hf_logger.filters):
        hf_logger.addFilter(_MessageFilter(HFLM_MODEL_WARNINGS))
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@functools.cache
def _silence_request_building_bar() -> None:
    if getattr(lm_task, "tqdm", None) is tqdm:
        lm_task.tqdm = functools.partial(tqdm, disable=True)


@functools.cache
def _cache_jinja_templates() -> None:
    original = getattr(lm_utils, "apply_template", None)
    env = getattr(lm_utils, "env", None)
    if env is None or original is None or getattr(original, "_evomerge_cached", False):
        return  # not shaped as expected (another lm-eval version): leave it alone
    compile_ = functools.lru_cache(maxsize=1024)(env.from_string)

    @functools.wraps(original)  # keeps the original reachable (__wrapped__) for the hash test
    def apply_template(template: str, doc: dict) -> str:
        return compile_(template).render(**doc)

    apply_template._evomerge_cached = True  # type: ignore[attr-defined]
    lm_utils.apply_template = apply_template


class _QuietHFLM(HFLM):
    def generate_until(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
        return super().generate_until(requests, disable_tqdm=True)

    def loglikelihood(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
        return super().loglikelihood_rolling(requests, disable_tqdm=True)
