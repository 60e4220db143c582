"""Bad input, counted: every malformed input of the test corpus through the real command line.

Each input goes through every command it applies to (a bad space through `validate` and `search`, a bad
target through `merge` and `export`, ...). An invocation is *clean* when it exits 2 with one `error: ` line
and leaves nothing behind (no study row, no output folder); a *traceback* when it prints one or exits
with anything but 0 or 2; *wrongly accepted* when it exits 0 on input that is bad.

    python bench/bad_input.py [--subprocess]

`--subprocess` runs each invocation as `python -m evomerge.cli` (slower; the same code path).
Ends with `RESULT {"inputs": n, "invocations": n, "clean": n, "tracebacks": n, "wrongly_accepted": n,
"multi_line": n, "left_behind": n}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_bad_input as corpus  # noqa: E402
import test_validate as validate_corpus  # noqa: E402
from fixtures_models import make_tiny_llama_family  # noqa: E402


def _cases(work: Path) -> list[tuple[str, list[list[str]], Path]]:
    """(input name, the invocations it gets, the folder that must stay free of a study and outputs)."""
    family = make_tiny_llama_family(work / "family", n_experts=2)
    cases: list[tuple[str, list[list[str]], Path]] = []

    def folder(name: str) -> Path:
        d = work / "cases" / name.replace(" ", "_")
        d.mkdir(parents=True)
        return d

    for name, data in corpus.BAD_SPACES.items():
        d = folder(f"space-{name}")
        (d / "space.yaml").write_bytes(data)
        s = str(d / "space.yaml")
        cases.append((f"space:{name}", [["validate", "--space", s],
                                       ["search", "--space", s, "--storage", f"sqlite:///{d / 's.db'}"]], d))
    vroot = work / "validate"
    vroot.mkdir()
    validate_corpus.make_root(vroot)
    for name, (text, _field, _words) in validate_corpus.BAD.items():
        p = vroot / f"{name.replace(' ', '_')}.yaml"
        p.write_text(text)
        d = folder(f"model-{name}")
        cases.append((f"space:{name}", [["validate", "--space", str(p)],
                                       ["search", "--space", str(p), "--storage", f"sqlite:///{d / 's.db'}"]], d))
    for name, args in corpus.USAGE_ERRORS.items():
        cases.append((f"usage:{name}", [args], folder(f"usage-{name}")))
    for name in ("text_file", "other_application"):
        d = folder(f"storage-{name}")
        db = d / "x.db"
        corpus.make_foreign_storage(name, db)
        url = f"sqlite:///{db}"
        cases.append((f"storage:{name}", [["status", "--storage", url], ["front", "s", "--storage", url],
                                          ["storage", "upgrade", "--storage", url]], d))
    for weight in ("abc", float("nan"), float("inf"), [1, "x"], {"filter": "mlp"}):
        d = folder(f"mergekit-{weight}")
        (d / "m.yaml").write_text(corpus.mergekit_yaml(family, weight))
        cases.append((f"mergekit:weight={weight}", [["merge", str(d / "m.yaml"), "--out", str(d / "out")]], d))
    (work / "store").mkdir()
    store = corpus.make_exported_store(family, work / "store")
    for kind in corpus.TARGETS:
        d = folder(f"target-{kind}")
        cfg = d.parent / f"m-{kind}.yaml"
        cfg.write_text(corpus.mergekit_yaml(family))
        out, _ = corpus.make_target(kind, d)
        cases.append((f"target:{kind}", [["merge", str(cfg), "--out", str(out)],
                                         ["export", "s", "--candidate", "1", "--out", str(out), "--storage", store]],
                      d))
    d = folder("missing-candidate")
    cases.append(("export:missing candidate",
                  [["export", "s", "--candidate", "7", "--out", str(d / "o"), "--storage", store]], d))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subprocess", action="store_true")
    args = ap.parse_args()
    counts = dict.fromkeys(("invocations", "clean", "tracebacks", "wrongly_accepted", "multi_line",
                            "left_behind"), 0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = _cases(work)
        for name, invocations, folder in cases:
            for argv in invocations:
                before = corpus.snapshot(folder)
                r = corpus.run_cli(argv, folder, subprocess_=args.subprocess)
                counts["invocations"] += 1
                lines = r.stderr.strip().splitlines()
                if "Traceback" in r.stderr or r.returncode not in (0, 2):
                    counts["tracebacks"] += 1
                    verdict = "TRACEBACK"
                elif r.returncode == 0:
                    counts["wrongly_accepted"] += 1
                    verdict = "ACCEPTED"
                elif len(lines) != 1 or not lines[0].startswith("error: "):
                    counts["multi_line"] += 1
                    verdict = "MULTI-LINE"
                else:
                    counts["clean"] += 1
                    verdict = "clean"
                after = corpus.snapshot(folder)
                left = {k for k, v in after.items() if before.get(k) != v}  # new or changed
                if left:
                    counts["left_behind"] += 1
                    verdict += f" (left {sorted(left)})"
                shown = " ".join(a if len(a) < 40 else a[:18] + "…" + a[-18:] for a in argv[:4])
                print(f"{verdict:<10} {name:<40} {shown}")
        counts = {"inputs": len(cases), **counts}
    print(f"\n{counts['inputs']} inputs, {counts['invocations']} invocations: {counts['clean']} clean one-line "
          f"errors, {counts['tracebacks']} tracebacks, {counts['wrongly_accepted']} wrongly accepted, "
          f"{counts['multi_line']} multi-line, {counts['left_behind']} left something behind")
    print("RESULT " + json.dumps(counts))


if __name__ == "__main__":
    main()
