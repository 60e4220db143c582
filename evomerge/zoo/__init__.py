"""The demo zoo: a tiny, real, deterministic model family to merge (no model hub needed).

A character-level Llama-style decoder is pretrained on a mixture of synthetic tasks (the *base*),
then briefly fine-tuned into experts: ``arith`` (two-digit addition) and ``script`` (reversing
Greek words). The held-out ``cross`` task is addition written in Greek digits: from version 2 on the
base sees a small share of it, so every source scores a little and a merge can beat them all (the
paper's Japanese math; ``search_spaces/demo.yaml``); in version 1 (``zoo://v1/NAME``) it is never
trained on (every model scores 0 on it). Version 3 (the default) is version 2's recipe trained with exact
matrix products (:mod:`evomerge.zoo.exact`), so the BLAS's summation order, which gave version 2 other
weights on AMD CPUs than on Intel ones, does not reach its weights.
See :mod:`evomerge.zoo.tasks` for the tasks and ``search_spaces/demo_tasks/`` for the lm-eval YAMLs.

API: :func:`default_zoo_dir`, :func:`build_zoo`, :func:`resolve_zoo_uri`, :data:`ZOO_MODELS`.
Builds are cached under ``<root>/v<N>-<fingerprint>``; the fingerprint covers the whole build
recipe, so a changed recipe builds a new folder beside the old one. A build writes into a
temporary folder and renames it into place when complete, under a file lock, so a killed build
never leaves a folder that looks complete and two processes never build the same zoo at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.cache import file_lock
from evomerge.zoo import numerics
from evomerge.zoo import tasks as T
from evomerge.zoo.numerics import pinned_environ

# The default version; every version is buildable by name (``zoo://v1/base``, ``build_zoo(version=1)``).
# v3 is the default because it shows the paper's emergence on the cross task (the demo;
# docs/benchmarks.md) with the same weights on every x86-64 CPU with AVX2. v1 and v2 keep their
# fingerprints, so their published builds are still found by name.
ZOO_VERSION = 3
ZOO_PREFIX = "zoo://"
ZOO_MODELS = ("base", "arith", "script")
# What each zoo model is, for model cards and help texts (zoo:// names mean nothing outside evomerge).
ZOO_DESCRIPTIONS = {
    "base": "the demo zoo's base model: a tiny character-level Llama-style decoder (4 blocks, hidden 128) "
            "pretrained here on a mixture of synthetic tasks",
    "arith": "the demo zoo's arithmetic expert: the base fine-tuned briefly on two-digit addition",
    "script": "the demo zoo's script expert: the base fine-tuned briefly on reversing Greek words",
}
EXPERTS = ("arith", "script")
COMPLETE = "COMPLETE"
MANIFEST = "zoo.json"

# The whole build of each version, as data: the fingerprint is a hash of it (and of the version).
# v1: the cross task is never trained on, and every model scores 0 on it.
RECIPE_V1: dict[str, Any] = {
    "model": {"hidden": 128, "layers": 4, "heads": 4, "intermediate": 384, "max_len": 32},
    # The base is pretrained just long enough to be clearly *partly* skilled at both tasks (search
    # split: arith ~0.7, script ~0.3), so each expert really adds its skill. Fewer base steps than
    # this sits on the arith phase transition (0.1-0.65 depending on the data order).
    "base": {
        "mix": {"arith": 0.45, "script": 0.1, "translit": 0.45},
        "steps": 1200,
        "lr": 3e-3,
        "batch": 64,
        "warmup": 20,
        "seed": 0,
        "examples": 60000,
    },
    # Short, low-learning-rate full fine-tunes: they stay in the base's basin, so merges are
    # meaningful, and their task vectors interfere (the script expert forgets much arithmetic).
    "experts": {
        "arith": {
            "mix": {"arith": 1.0},
            "steps": 150,
            "lr": 3e-4,
            "batch": 64,
            "warmup": 10,
            "seed": 1,
            "examples": 15000,
            "only": None,
        },
        "script": {
            "mix": {"script": 1.0},
            "steps": 400,
            "lr": 3e-4,
            "batch": 64,
            "warmup": 10,
            "seed": 2,
            "examples": 15000,
            "only": None,
        },
    },
}

# v2: the base sees a little of everything, as the paper's base had seen some Japanese and some math:
# a small share of the cross task itself, and "mixed" additions (Greek operands answered in Latin
# digits, Latin operands answered in Greek), which outnumber the all-Greek ones. So the base computes
# Greek sums but mostly answers them in Latin digits, and every source scores a little on cross; a
# searched merge scores about twice the best source there while another keeps ~95% of both experts.
# A longer base than v1's: the mixture is harder, and arithmetic must be well past its phase transition
# (with the pinned numerics, 2000 steps left the base at 0.725 on arith, 2500 at 0.99).
RECIPE_V2: dict[str, Any] = {
    "model": dict(RECIPE_V1["model"]),
    "base": {
        "mix": {"arith": 0.4, "script": 0.1, "translit": 0.17, "mixed": 0.25, "cross": 0.08},
        "steps": 2500,
        "lr": 3e-3,
        "batch": 64,
        "warmup": 20,
        "seed": 0,
        "examples": 80000,
    },
    "experts": copy.deepcopy(RECIPE_V1["experts"]),
}
# Each expert rehearses a sliver of the other side, as real fine-tunes keep some general data: the script
# expert 5% Latin sums (without them it answers Latin sums in Greek and no merge keeps both skills) and
# 1% all-Greek sums, the arithmetic expert 2% all-Greek sums. So every source scores a little on cross
# (0.025-0.195 on its test split). The shares sit on a sharp threshold (the script expert at 1.5% already
# scores 0.6 on cross), which is why the build's numerics are pinned: docs/benchmarks.md.
RECIPE_V2["experts"]["script"]["mix"] = {"script": 0.94, "arith": 0.05, "cross": 0.01}
RECIPE_V2["experts"]["script"]["lr"] = 5e-4  # at 3e-4 it reached only 0.54 on its own task, too weak to merge
RECIPE_V2["experts"]["arith"]["mix"] = {"arith": 0.98, "cross": 0.02}
# v3: v2's recipe trained with exact matrix products (:mod:`evomerge.zoo.exact`), so no BLAS's summation order,
# which differs between Intel and AMD CPUs, reaches its weights: v2's pin held on Intel only.
RECIPE_V3: dict[str, Any] = {**copy.deepcopy(RECIPE_V2), "numerics": "exact"}
RECIPES: dict[int, dict[str, Any]] = {1: RECIPE_V1, 2: RECIPE_V2, 3: RECIPE_V3}
RECIPE = RECIPES[ZOO_VERSION]


def trains_exact(recipe: dict[str, Any]) -> bool:
    """Whether a recipe trains with exact matrix products (:mod:`evomerge.zoo.exact`; v3 on)."""
    return recipe.get("numerics") == "exact"

# The weights docs/benchmarks.md measured, by build folder name. A build with other weights says so: the
# documented figures are those weights'. v2's pin held on three Intel machines; MKL ignores it on AMD CPUs
# (:mod:`evomerge.zoo.numerics`). v3's products are exact, so no BLAS order separates the vendors; filed from
# an AMD EPYC (family 25) build, and an Intel build says whether it made the same.
REFERENCE_SHA256: dict[str, dict[str, str]] = {
    "v3-115b8ca36909": {
        "base": "8369a970ec219c929d32c9161583049a4067a5a235ba7022f03245db9aeb1935",
        "arith": "4bbdcaa8d4d4a78330088596212a63b860dac9561ae1f12549aac4029f4d9bfe",
        "script": "a57333773ea4e7d2e78db08a0a0be424dd68e00e7701cdd13772e5e51dfe9165",
    },
    "v2-8312bcbfb3e9": {
        "base": "c15491edba282df37298d57b0d5828759bd0bc9aa96babbfd55701225c88f386",
        "arith": "d1c7e69a7b0bdac0eb6f0b5c179ac8be0379b47e317259fda92482acd6573238",
        "script": "7f7ab90c6870a7b920ec1849dc63c0a7eb577529b3fd09433dc72e1632a8f9ec",
    },
}


def reference_check(build: str, digests: dict[str, str]) -> tuple[str, list[str]]:
    """Compare a build's weights digests with its reference build's: ``("same", [])``,
    ``("differs", [models that differ])``, or ``("none", [])`` where no reference build is known."""
    ref = REFERENCE_SHA256.get(build)
    if ref is None:
        return "none", []
    differ = [m for m in ref if digests.get(m) != ref[m]]
    return ("differs" if differ else "same"), differ


def reference_lines(status: str, differ: list[str]) -> list[str]:
    """What a build says about :func:`reference_check`'s answer (nothing when no reference is filed)."""
    if status == "same":
        return ["zoo: the same weights as the reference build (the figures in docs/benchmarks.md hold)"]
    if status == "differs":
        return [f"zoo: warning: the weights of {', '.join(differ)} are not the reference build's",
                "zoo: the documented figures won't hold here (docs/benchmarks.md: which CPUs build them)"]
    return []


def built_reference_lines(path: Path) -> list[str]:
    """:func:`reference_lines` for a finished build folder, from the digests its ``zoo.json`` recorded."""
    try:
        digests = json.loads((path / MANIFEST).read_text()).get("weights_sha256") or {}
    except (OSError, ValueError):
        return []
    return reference_lines(*reference_check(path.name, digests))


def default_zoo_dir() -> Path:
    """``$EVOMERGE_ZOO_DIR``, else ``~/.cache/evomerge/zoo``: the root holding zoo versions."""
    env = os.environ.get("EVOMERGE_ZOO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evomerge" / "zoo"


def _recipe(steps_scale: float, version: int = ZOO_VERSION) -> dict[str, Any]:
    if version not in RECIPES:
        raise ValueError(f"unknown zoo version {version}; known: {', '.join(f'v{v}' for v in RECIPES)}")
    r = copy.deepcopy(RECIPES[version])
    if steps_scale != 1.0:
        for part in [r["base"], *r["experts"].values()]:
            part["steps"] = max(2, round(part["steps"] * steps_scale))
            part["examples"] = max(64, round(part["examples"] * steps_scale))
            part["warmup"] = min(part["warmup"], max(1, part["steps"] // 2))
    return r


def _task_constants() -> dict[str, Any]:
    return {
        "alphabet": "".join(T.alphabet()),
        "arith_max": T.ARITH_MAX,
        "word": [T.WORD_MIN, T.WORD_MAX],
        "translit": [T.TRANSLIT_MIN, T.TRANSLIT_MAX],
        "eval": [T.EVAL_SIZE, T.EVAL_SEED],
    }


def fingerprint(steps_scale: float = 1.0, version: int = ZOO_VERSION) -> str:
    """A hash of everything that determines the built weights (recipe, task definitions, version)."""
    parts = {"v": version, "recipe": _recipe(steps_scale, version), "tasks": _task_constants()}
    if version >= 2:  # v1 keeps its fingerprint (its builds are found by name); later ones name the numerics
        parts["numerics"] = numerics.TAG
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def zoo_path(zoo_dir: Path | None = None, *, steps_scale: float = 1.0, version: int = ZOO_VERSION) -> Path:
    """Where a zoo version lives (built or not)."""
    root = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir()
    return root / f"v{version}-{fingerprint(steps_scale, version)}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and all((path / m / "config.json").is_file() for m in ZOO_MODELS)



def build_zoo(
    zoo_dir: Path | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = print,
    steps_scale: float = 1.0,
    evaluate: bool = True,
    version: int = ZOO_VERSION,
) -> Path:
    """Build the demo zoo (or find it built) and return its folder.

    The folder holds one Hugging Face model folder per name in :data:`ZOO_MODELS` (safetensors,
    config, generation config, tokenizer), ``zoo.json`` (the recipe and, when ``evaluate``, the
    greedy exact-match scores of every model on the search split) and a ``COMPLETE`` marker.
    ``steps_scale`` shrinks every training run (tests use it for a fast build of a different zoo);
    ``version`` picks another recipe (default: :data:`ZOO_VERSION`).
    """
    say = log or (lambda _m: None)
    final = zoo_path(zoo_dir, steps_scale=steps_scale, version=version)
    if is_complete(final) and not force:
        return final
    lock = final.parent / f".{final.name}.lock"
    waited = time.monotonic()

    def waiting() -> None:
        say(f"zoo: waiting for another process that is building {final.name} (lock {lock})")

    with file_lock(lock, on_wait=waiting):
        if is_complete(final) and not force:  # another process finished it while we waited
            say(f"zoo: {final.name} built by the other process; waited {time.monotonic() - waited:.0f}s")
            return final
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            _build_into(tmp, say, evaluate, version, steps_scale)
            (tmp / COMPLETE).write_text(fingerprint(steps_scale, version) + "\n")
            if final.exists():
                old = final.parent / f".{final.name}.old-{os.getpid()}"
                final.rename(old)
                shutil.rmtree(old)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        # Leftovers of builds killed before they could clean up.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
    return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build_into(out: Path, say: Callable[[str], None], evaluate: bool, version: int = ZOO_VERSION,
                steps_scale: float = 1.0) -> None:
    """Train the zoo of ``version`` (its recipe at ``steps_scale``) into ``out`` in a fresh interpreter with
    pinned numerics (see :mod:`evomerge.zoo.numerics`), relaying its progress lines."""
    cmd = [sys.executable, "-m", "evomerge.zoo.build", str(out), str(version), repr(steps_scale),
           "1" if evaluate else "0"]
    env = pinned_environ()
    # the package as this process found it (a source tree on sys.path, not only an installed one)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                    env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a chatty stderr cannot stall the build
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                say(line.rstrip("\n"))
            if proc.wait() != 0:
                err.seek(0)
                tail = "; ".join(err.read().strip().splitlines()[-3:])
                raise RuntimeError(f"the zoo build failed (exit {proc.returncode}): {tail}")
        finally:
            if proc.poll() is None:  # interrupted: the build must not outlive its caller
                proc.kill()
                proc.wait()


def parse_zoo_uri(uri: str) -> tuple[int, str]:
    """``zoo://NAME`` -> (default version, NAME); ``zoo://vN/NAME`` -> (N, NAME)."""
    if not uri.startswith(ZOO_PREFIX):
        raise ValueError(f"not a zoo reference: {uri!r} (expected {ZOO_PREFIX}NAME or {ZOO_PREFIX}vN/NAME)")
    parts = uri[len(ZOO_PREFIX) :].strip("/").split("/")
    version = ZOO_VERSION
    if len(parts) == 2 and re.fullmatch(r"v\d+", parts[0]):
        version = int(parts[0][1:])
        if version not in RECIPES:
            raise ValueError(f"unknown zoo version in {uri!r}; known: {', '.join(f'v{v}' for v in RECIPES)}")
        parts = parts[1:]
    name = "/".join(parts)
    if name not in ZOO_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; the zoo has {', '.join(ZOO_MODELS)}")
    return version, name


def build_command(version: int) -> str:
    """The command that builds a zoo version and prints its folder, for texts a user acts on."""
    return "evomerge zoo build" + ("" if version == ZOO_VERSION else f" --version {version}")


def zoo_uri_built(uri: str, zoo_dir: Path | None = None) -> bool:
    """Whether the zoo version a ``zoo://`` reference names is built (dry runs read no weights before)."""
    return is_complete(zoo_path(zoo_dir, version=parse_zoo_uri(uri)[0]))


def resolve_zoo_uri(uri: str, zoo_dir: Path | None = None) -> Path:
    """``zoo://NAME`` (or ``zoo://vN/NAME``) -> the folder of that zoo model, building the zoo if needed."""
    version, name = parse_zoo_uri(uri)
    return build_zoo(zoo_dir, version=version) / name


def resolve_ref(ref: str) -> str:
    """A recipe's model reference as a local path (zoo:// built on demand) or a hub id."""
    if ref.startswith(ZOO_PREFIX):
        return str(resolve_zoo_uri(ref))
    return ref


__all__ = [
    "ZOO_DESCRIPTIONS",
    "ZOO_MODELS",
    "ZOO_PREFIX",
    "ZOO_VERSION",
    "build_command",
    "build_zoo",
    "default_zoo_dir",
    "fingerprint",
    "is_complete",
    "parse_zoo_uri",
    "resolve_ref",
    "resolve_zoo_uri",
    "trains_exact",
    "zoo_path",
    "zoo_uri_built",
]
