"""Deterministic synthetic tasks for the demo zoo.

Three evaluated tasks, plus one auxiliary task used only in the base model's pretraining mixture:

- ``arith``: two-digit addition written with Latin digits, ``"12+35="`` -> ``"47"``.
- ``script``: reverse a word written in Greek letters, ``"αβγδ>"`` -> ``"δγβα"``.
- ``cross``: the arithmetic asked in the other script. Digits are written as the Greek letters
  ``α..κ`` (0..9), ``"βγ+δε="`` -> ``"εη"`` (12+34=46). No model is ever trained on it:
  it mirrors the "Japanese math" setting, a held-out skill that needs both parents.
- ``translit`` (pretraining mixture only): write a digit string in the Greek digit script and back,
  ``"472#"`` -> ``"εθγ"`` and ``"εθγ#"`` -> ``"472"``. It teaches the base model the digit/letter
  correspondence without ever showing an addition in Greek.
- ``mixed`` (pretraining mixture only, from zoo v2): an addition with the operands in one script and
  the answer in the other, ``"βγ+δε="`` -> ``"46"`` and ``"12+34="`` -> ``"εη"``. Partial cross-like
  data: reading Greek digits and writing them, each next to an addition, never both at once.

Every problem has a canonical key (its prompt). A stable hash of the key puts it in exactly one
partition: ``train`` (85 %), ``search`` (7.5 %) or ``test`` (7.5 %). Training draws only from
``train``; the ``search`` split (the search objectives) and the ``test`` split (reporting only)
draw from their own partitions, so the three are disjoint by construction, for every seed.
Evaluation examples are stored as ``{"prompt", "target"}`` records; a model sees
``prompt + target + "\\n"`` and generation stops at the newline.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

DIGITS = "0123456789"
# Greek small letters without final sigma: 24 letters; the first ten double as the Greek digits.
GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
GREEK_DIGITS = GREEK[:10]
TO_GREEK = str.maketrans(DIGITS, GREEK_DIGITS)
FROM_GREEK = str.maketrans(GREEK_DIGITS, DIGITS)

EVAL_TASKS = ("arith", "script", "cross")
ALL_TASKS = ("arith", "script", "cross", "translit", "mixed")
SPLITS = ("train", "search", "test")

# Lengths of Greek words in the script task.
WORD_MIN, WORD_MAX = 3, 7
# Operands of the addition task lie in [0, ARITH_MAX].
ARITH_MAX = 99
# Digit strings in the transliteration task.
TRANSLIT_MIN, TRANSLIT_MAX = 2, 5


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    target: str

    @property
    def text(self) -> str:
        """The full training string (without special tokens)."""
        return f"{self.prompt}{self.target}\n"

    def as_record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "target": self.target}


def partition(task: str, key: str) -> str:
    """The split a problem belongs to; a pure function of the task and the problem's prompt."""
    h = int.from_bytes(hashlib.sha256(f"{task}\x00{key}".encode()).digest()[:8], "big") % 1000
    if h < 850:
        return "train"
    if h < 925:
        return "search"
    return "test"


def to_greek(s: str) -> str:
    return s.translate(TO_GREEK)


def _arith(a: int, b: int, greek: bool) -> Example:
    p, t = f"{a}+{b}=", str(a + b)
    if greek:
        return Example("cross", to_greek(p), to_greek(t))
    return Example("arith", p, t)


def _sample(task: str, rng: random.Random) -> Example:
    if task in ("arith", "cross"):
        return _arith(rng.randint(0, ARITH_MAX), rng.randint(0, ARITH_MAX), task == "cross")
    if task == "script":
        w = "".join(rng.choice(GREEK) for _ in range(rng.randint(WORD_MIN, WORD_MAX)))
        return Example("script", f"{w}>", w[::-1])
    if task == "mixed":
        plain = _arith(rng.randint(0, ARITH_MAX), rng.randint(0, ARITH_MAX), False)
        if rng.random() < 0.5:
            return Example("mixed", to_greek(plain.prompt), plain.target)
        return Example("mixed", plain.prompt, to_greek(plain.target))
    if task == "translit":
        d = "".join(rng.choice(DIGITS) for _ in range(rng.randint(TRANSLIT_MIN, TRANSLIT_MAX)))
        if rng.random() < 0.5:
            return Example("translit", f"{d}#", to_greek(d))
        return Example("translit", f"{to_greek(d)}#", d)
    raise ValueError(f"unknown task {task!r}; known: {ALL_TASKS}")


def _key_task(task: str) -> str:
    # arith and cross share the problem space (the same sum in two scripts): partition them by the
    # same key so a sum held out for evaluation in one script is held out in the other too.
    return "arith" if task in ("cross", "mixed") else task


def _key(ex: Example) -> str:
    return ex.prompt.translate(FROM_GREEK) if ex.task in ("cross", "mixed") else ex.prompt


def stream(task: str, split: str, seed: int) -> Iterator[Example]:
    """An endless deterministic stream of examples of ``task`` that lie in ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    rng = random.Random(f"{task}/{split}/{seed}")
    while True:
        ex = _sample(task, rng)
        if partition(_key_task(task), _key(ex)) == split:
            yield ex


def generate(task: str, split: str, n: int, seed: int = 0, *, unique: bool = True) -> list[Example]:
    """``n`` examples of ``task`` from ``split`` (distinct prompts when ``unique``)."""
    out: list[Example] = []
    seen: set[str] = set()
    for ex in stream(task, split, seed):
        if unique:
            if ex.prompt in seen:
                continue
            seen.add(ex.prompt)
        out.append(ex)
        if len(out) == n:
            return out
    raise AssertionError("unreachable")


def mixture(weights: dict[str, float], n: int, seed: int) -> list[Example]:
    """``n`` training examples drawn from the tasks in ``weights`` in proportion (deterministic)."""
    rng = random.Random(f"mixture/{seed}")
    streams = {t: stream(t, "train", seed) for t in weights}
    names = list(weights)
    w = [weights[t] for t in names]
    return [next(streams[rng.choices(names, w)[0]]) for _ in range(n)]


# Evaluation data shipped with the lm-eval task YAMLs.
EVAL_SIZE = {"search": 200, "test": 200}
EVAL_SEED = 1234


def eval_set(task: str, split: str) -> list[Example]:
    """The canonical evaluation examples of ``task`` on ``split`` ("search" or "test")."""
    if split not in EVAL_SIZE:
        raise ValueError(f"evaluation splits are {tuple(EVAL_SIZE)}, not {split!r}")
    return generate(task, split, EVAL_SIZE[split], EVAL_SEED)


def alphabet() -> list[str]:
    """Every character any task can produce, in a fixed order."""
    return list(DIGITS) + list("+=>#\n") + list(GREEK)
