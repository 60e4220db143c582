"""Train the demo zoo into a folder: ``python -m evomerge.zoo.build OUT VERSION STEPS_SCALE EVALUATE``.

Run by :func:`evomerge.zoo.build_zoo` in a fresh interpreter with pinned numerics
(:mod:`evomerge.zoo.numerics`: they must be set before torch loads), under its lock and into its
temporary folder; progress goes to stdout one line at a time.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from evomerge.zoo import MANIFEST, ZOO_MODELS, _recipe, reference_check, reference_lines, trains_exact
from evomerge.zoo import tasks as T
from evomerge.zoo.modeling import ModelSpec, TrainSpec, greedy_accuracy, make_model, make_tokenizer, train
from evomerge.zoo.numerics import PINNED_ENV, is_pinned


def weights_digest(folder: Path) -> str:
    """sha256 of a saved model's safetensors files: two builds with equal digests hold equal weights."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def build_into(out: Path, recipe: dict[str, Any], version: int, evaluate: bool) -> None:
    t0 = time.monotonic()
    say = lambda m: print(m, flush=True)  # noqa: E731 - the parent relays each line as it comes
    torch.set_num_threads(1)  # with the pinned settings, a fixed reduction order; and tiny matrices gain nothing
    out.mkdir(parents=True)
    tok = make_tokenizer()
    spec = ModelSpec(**recipe["model"])
    evals = {t: T.eval_set(t, "search") for t in T.EVAL_TASKS} if evaluate else {}
    scores: dict[str, dict[str, float]] = {}
    digests: dict[str, str] = {}

    def fit(model, part: dict[str, Any], name: str) -> None:
        data = T.mixture(part["mix"], part["examples"], part["seed"])
        only = tuple(part["only"]) if part.get("only") else None
        lr_mult = tuple((str(k), float(f)) for k, f in part["lr_mult"]) if part.get("lr_mult") else None
        ts = TrainSpec(steps=part["steps"], lr=part["lr"], batch=part["batch"], warmup=part["warmup"], only=only,
                       lr_mult=lr_mult)
        t = time.monotonic()
        loss = train(model, tok, data, ts, part["seed"], spec.max_len, exact=trains_exact(recipe))
        msg = f"zoo: {name}: {part['steps']} steps in {time.monotonic() - t:.0f}s, loss {loss:.3f}"
        if evaluate:
            scores[name] = {k: round(greedy_accuracy(model, tok, v), 4) for k, v in evals.items()}
            msg += " | " + " ".join(f"{k} {v:.2f}" for k, v in scores[name].items())
        say(msg)
        hf_logging.disable_progress_bar()  # "Writing model shards" bars would bury the zoo's own lines
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        digests[name] = weights_digest(out / name)

    build = out.name.split(".tmp-")[0].lstrip(".")  # the folder it is renamed to when complete
    say(f"zoo: building {build} (base + {len(recipe['experts'])} experts)")
    base = make_model(spec, len(tok), tok, recipe["base"]["seed"])
    fit(base, recipe["base"], "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, part in recipe["experts"].items():
        base.load_state_dict(base_state)
        fit(base, part, name)
    status, differ = reference_check(build, digests)
    for line in reference_lines(status, differ):
        say(line)
    manifest = {
        "version": version,
        "reference": {"build": build, "status": status, "differ": differ},
        "models": list(ZOO_MODELS),
        "recipe": recipe,
        "spec": asdict(spec),
        "search_scores": scores,
        "weights_sha256": digests,
        "numerics": {"pinned": is_pinned(), "env": PINNED_ENV, "machine": platform.machine(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__},
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    say(f"zoo: done in {time.monotonic() - t0:.0f}s")


def main(argv: list[str]) -> None:
    out, version, steps_scale, evaluate = Path(argv[0]), int(argv[1]), float(argv[2]), argv[3] == "1"
    build_into(out, _recipe(steps_scale, version), version, evaluate)


if __name__ == "__main__":
    main(sys.argv[1:])
