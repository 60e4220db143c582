"""The demo zoo: tasks, splits, shipped lm-eval data, tokenizer, cached atomic builds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from evomerge import zoo
from evomerge.zoo import tasks as T
from evomerge.zoo.lmeval_tasks import task_files, task_names

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "search_spaces" / "demo_tasks"
TINY = 0.005  # steps_scale of the test builds: every step runs, each for a couple of updates
OTHER = next(v for v in sorted(zoo.RECIPES, reverse=True) if v != zoo.ZOO_VERSION)  # a version not the default


def test_generators_are_deterministic():
    for task in T.ALL_TASKS:
        a = T.generate(task, "train", 50, seed=3)
        assert a == T.generate(task, "train", 50, seed=3)
        assert a != T.generate(task, "train", 50, seed=4)
        assert all(ex.task == task for ex in a)
    assert T.mixture({"arith": 1, "script": 1}, 100, 0) == T.mixture({"arith": 1, "script": 1}, 100, 0)


def test_examples_are_correct():
    for ex in T.generate("arith", "train", 50):
        a, b = ex.prompt.rstrip("=").split("+")
        assert int(ex.target) == int(a) + int(b)
    for ex in T.generate("cross", "search", 50):
        plain = ex.prompt.translate(T.FROM_GREEK)
        a, b = plain.rstrip("=").split("+")
        assert ex.target.translate(T.FROM_GREEK) == str(int(a) + int(b))
        assert not set(ex.prompt + ex.target) & set(T.DIGITS)
    # mixed: an addition with the operands in one script and the answer in the other, both ways
    sides = set()
    for ex in T.generate("mixed", "train", 50):
        a, b = ex.prompt.translate(T.FROM_GREEK).rstrip("=").split("+")
        assert ex.target.translate(T.FROM_GREEK) == str(int(a) + int(b))
        greek_prompt, greek_answer = not set(ex.prompt) & set(T.DIGITS), not set(ex.target) & set(T.DIGITS)
        assert greek_prompt != greek_answer
        sides.add(greek_prompt)
    assert sides == {True, False}
    for ex in T.generate("script", "test", 50):
        assert ex.target == ex.prompt.rstrip(">")[::-1]
        assert set(ex.target) <= set(T.GREEK)


def test_splits_are_disjoint():
    ev = {(t, s): T.eval_set(t, s) for t in T.EVAL_TASKS for s in ("search", "test")}
    for (_t, s), exs in ev.items():
        assert len(exs) == T.EVAL_SIZE[s]
        assert len({e.prompt for e in exs}) == len(exs)
    for t in T.EVAL_TASKS:
        search = {e.prompt for e in ev[(t, "search")]}
        test = {e.prompt for e in ev[(t, "test")]}
        assert not search & test
    # No training prompt of any task is an evaluation problem (cross shares arith's problems).
    held_out = {e.prompt.translate(T.FROM_GREEK) for exs in ev.values() for e in exs}
    for t in ("arith", "script", "translit", "cross", "mixed"):
        train = {e.prompt.translate(T.FROM_GREEK) for e in T.generate(t, "train", 3000, seed=0, unique=False)}
        assert not train & held_out, t
    # v1 never trains on the cross task; from v2 the base sees a small share of its training problems
    # (as the paper's base had seen some Japanese and some math), the experts a sliver (at most 2%): enough
    # that each scores a little on cross, too little to learn it.
    v1 = [zoo.RECIPES[1]["base"], *zoo.RECIPES[1]["experts"].values()]
    assert all("cross" not in p["mix"] for p in v1)
    v2 = zoo.RECIPES[2]
    assert 0 < v2["base"]["mix"]["cross"] / sum(v2["base"]["mix"].values()) <= 0.1
    assert all(0 < p["mix"]["cross"] / sum(p["mix"].values()) <= 0.02 for p in v2["experts"].values())


def test_shipped_task_files_match_the_generator():
    expected = task_files()
    for rel, text in expected.items():
        assert (TASK_DIR / rel).read_text(encoding="utf-8") == text, rel
    shipped = {p.relative_to(TASK_DIR).as_posix() for p in TASK_DIR.rglob("*") if p.is_file()}
    assert shipped == set(expected)
    assert {f"{n}.yaml" for n in task_names()} <= shipped


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from evomerge.zoo.modeling import make_tokenizer

    make_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, PreTrainedTokenizerFast)
    for s in ["12+35=47\n", "αβγδ>δγβα\n", "βγ+δε=εη", "472#εθγ"]:
        ids = tok(s).input_ids
        assert ids[0] == tok.bos_token_id and len(ids) == len(s) + 1
        assert tok.decode(ids, skip_special_tokens=True) == s
        assert tok.decode(ids[1:]) == s
    assert tok.unk_token_id is not None and tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok("Z").input_ids[1] == tok.unk_token_id
    assert "\n" in tok.get_vocab()


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    lines: list[str] = []
    t = time.monotonic()
    path = zoo.build_zoo(root, steps_scale=TINY, log=lines.append)
    return root, path, lines, time.monotonic() - t


def test_tiny_build_produces_loadable_models(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, path, lines, _ = tiny_zoo
    assert path == zoo.zoo_path(root, steps_scale=TINY) and zoo.is_complete(path)
    assert any("base" in ln for ln in lines) and lines[-1].startswith("zoo: done")
    manifest = json.loads((path / "zoo.json").read_text())
    assert set(manifest["search_scores"]) == set(zoo.ZOO_MODELS)
    shapes = None
    for name in zoo.ZOO_MODELS:
        d = path / name
        assert (d / "model.safetensors").is_file() and (d / "generation_config.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert model.config.vocab_size == len(tok)
        s = {k: v.shape for k, v in model.state_dict().items()}
        assert shapes is None or s == shapes
        shapes = s
    # The experts differ from the base and from each other.
    from safetensors.torch import load_file

    w = {n: load_file(path / n / "model.safetensors") for n in zoo.ZOO_MODELS}
    k = "model.layers.0.mlp.down_proj.weight"
    assert not w["base"][k].equal(w["arith"][k]) and not w["arith"][k].equal(w["script"][k])


def test_build_is_deterministic(tiny_zoo, tmp_path):
    from safetensors.torch import load_file

    _, path, _, _ = tiny_zoo
    again = zoo.build_zoo(tmp_path, steps_scale=TINY, log=None, evaluate=False)
    for name in zoo.ZOO_MODELS:
        a, b = load_file(path / name / "model.safetensors"), load_file(again / name / "model.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name


def test_cache_reuse_and_force(tiny_zoo):
    root, path, _, _ = tiny_zoo
    stamp = (path / "base" / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    t = time.monotonic()
    assert zoo.build_zoo(root, steps_scale=TINY, log=lines.append) == path
    assert time.monotonic() - t < 0.5 and lines == []
    assert (path / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert zoo.build_zoo(root, steps_scale=TINY, log=lines.append, force=True, evaluate=False) == path
    assert lines and zoo.is_complete(path)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == [path.name]


def test_killed_build_leaves_no_complete_zoo(tmp_path, monkeypatch):
    def boom(out, say, evaluate, version, steps_scale):
        out.mkdir(parents=True)
        (out / "base").mkdir()
        (out / "base" / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_build_into", boom)
    with pytest.raises(KeyboardInterrupt):
        zoo.build_zoo(tmp_path, steps_scale=TINY, log=None)
    final = zoo.zoo_path(tmp_path, steps_scale=TINY)
    assert not final.exists() and not zoo.is_complete(final)
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    # A folder without the COMPLETE marker (say, copied half-way) is not taken for a zoo.
    for m in zoo.ZOO_MODELS:
        (final / m).mkdir(parents=True)
        (final / m / "config.json").write_text("{}")
    assert not zoo.is_complete(final)
    # A temp folder left by a dead process is cleaned by the next build.
    stale = tmp_path / f".{final.name}.tmp-999999999"
    stale.mkdir()
    monkeypatch.undo()
    zoo.build_zoo(tmp_path, steps_scale=TINY, log=None, evaluate=False)
    assert zoo.is_complete(final) and not stale.exists()


def test_default_dir_and_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_ZOO_DIR", str(tmp_path))
    assert zoo.default_zoo_dir() == tmp_path
    monkeypatch.delenv("EVOMERGE_ZOO_DIR")
    assert zoo.default_zoo_dir() == Path.home() / ".cache" / "evomerge" / "zoo"
    # A complete zoo at the full-scale path is resolved without building anything.
    monkeypatch.setenv("EVOMERGE_ZOO_DIR", str(tmp_path))
    full = zoo.zoo_path()
    for m in zoo.ZOO_MODELS:
        (full / m).mkdir(parents=True)
        (full / m / "config.json").write_text("{}")
    (full / zoo.COMPLETE).write_text("x\n")
    assert zoo.resolve_zoo_uri("zoo://arith") == full / "arith"
    assert zoo.resolve_zoo_uri("zoo://base/") == full / "base"
    assert zoo.resolve_zoo_uri(f"zoo://v{zoo.ZOO_VERSION}/base") == full / "base"
    # Another version is named by its number and lives in its own folder.
    other = zoo.zoo_path(version=OTHER)
    assert other != full and other.name.startswith(f"v{OTHER}-")
    assert not zoo.zoo_uri_built(f"zoo://v{OTHER}/script") and zoo.zoo_uri_built("zoo://script")
    for m in zoo.ZOO_MODELS:
        (other / m).mkdir(parents=True)
        (other / m / "config.json").write_text("{}")
    (other / zoo.COMPLETE).write_text("x\n")
    assert zoo.resolve_zoo_uri(f"zoo://v{OTHER}/script") == other / "script"
    assert zoo.parse_zoo_uri(f"zoo://v{OTHER}/script") == (OTHER, "script")
    with pytest.raises(ValueError, match="unknown zoo version"):
        zoo.resolve_zoo_uri("zoo://v99/arith")
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.resolve_zoo_uri("zoo://nope")
    with pytest.raises(ValueError, match="not a zoo reference"):
        zoo.resolve_zoo_uri("/some/path")


def test_fingerprint_tracks_the_recipe(monkeypatch):
    fp = zoo.fingerprint()
    assert fp == zoo.fingerprint() and fp != zoo.fingerprint(TINY)
    monkeypatch.setitem(zoo.RECIPE["base"], "steps", zoo.RECIPE["base"]["steps"] + 1)
    assert zoo.fingerprint() != fp
    monkeypatch.undo()
    monkeypatch.setattr(T, "WORD_MAX", T.WORD_MAX + 1)
    assert zoo.fingerprint() != fp
    monkeypatch.undo()
    # the pinned numerics are part of what makes the weights (v1 keeps the fingerprint it always had)
    v1 = zoo.fingerprint(version=1)
    monkeypatch.setattr(zoo.numerics, "TAG", "other")
    assert zoo.fingerprint() != fp and zoo.fingerprint(version=1) == v1
    monkeypatch.undo()
    # Each version has its own fingerprint, the one its published builds and figures carry
    # (docs/benchmarks.md), so a zoo built before versions existed, or before v2 became the default, is
    # found, not rebuilt.
    assert zoo.fingerprint(version=1) == "d0a8ce535701"
    assert zoo.fingerprint(version=2) == "8312bcbfb3e9"
    assert zoo.fingerprint() == zoo.fingerprint(version=zoo.ZOO_VERSION)
    with pytest.raises(ValueError, match="unknown zoo version"):
        zoo.fingerprint(version=99)


def test_lm_eval_runs_the_shipped_yaml_on_a_zoo_model(tiny_zoo, tmp_path, monkeypatch):
    """The YAMLs load offline and the char tokenizer + HFLM generation path works end to end."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, tasks)
    for y in tasks.glob("*.yaml"):  # data paths are relative to the YAML; lm-eval wants them absolute
        y.write_text(y.read_text().replace("test: data/", f"test: {tasks}/data/"))
    _, path, _, _ = tiny_zoo
    model = AutoModelForCausalLM.from_pretrained(path / "arith")
    tok = AutoTokenizer.from_pretrained(path / "arith")
    res = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=16),
        tasks=["demo_arith_search", "demo_cross_test"],
        task_manager=TaskManager(include_defaults=False, include_path=str(tasks)),
        limit=8,
        log_samples=True,
    )
    from evomerge.zoo.modeling import greedy_accuracy

    # lm-eval generates what the zoo's own greedy decoder (which scored the models) generates, and scores
    # it as the zoo does: the YAMLs' prompt, stop and metric mean what the zoo means. (A tiny zoo's
    # answers are mostly wrong: the generated text is compared, not only the 0/1 verdicts.)
    for name in ("demo_arith_search", "demo_cross_test"):
        samples = res["samples"][name]
        assert len(samples) == 8
        for s in samples:
            said = s["filtered_resps"][0]
            # our decoder "scores" lm-eval's answer as the target: a hit iff it generates the same text
            assert greedy_accuracy(model, tok, [T.Example(name, s["doc"]["prompt"], said)]) == 1.0, (name, said)
            assert float(s["exact_match"]) == float(said == s["doc"]["target"]), (name, said)
        hits = [float(s["filtered_resps"][0] == s["doc"]["target"]) for s in samples]
        assert res["results"][name]["exact_match,none"] == pytest.approx(sum(hits) / 8)


def test_other_version_builds_by_name(tiny_zoo, tmp_path):
    _, path, _, _ = tiny_zoo
    built = zoo.build_zoo(tmp_path, steps_scale=TINY, log=None, evaluate=False, version=OTHER)
    assert built == zoo.zoo_path(tmp_path, steps_scale=TINY, version=OTHER) and zoo.is_complete(built)
    assert built.name.startswith(f"v{OTHER}-") and path.name.startswith(f"v{zoo.ZOO_VERSION}-")
    manifest = json.loads((built / "zoo.json").read_text())
    assert manifest["version"] == OTHER
    assert manifest["recipe"]["base"]["mix"] == zoo.RECIPES[OTHER]["base"]["mix"]


def test_spaces_name_the_zoo_versions_they_merge():
    from evomerge.space import load_space

    spaces = ROOT / "search_spaces"
    # The demo merges the default version, the one that shows the emergence on the cross task.
    assert load_space(spaces / "demo.yaml").zoo_versions == [zoo.ZOO_VERSION] == [3]
    assert zoo.parse_zoo_uri("zoo://base") == (3, "base") and zoo.parse_zoo_uri("zoo://v1/base") == (1, "base")
    with pytest.raises(ValueError, match="unknown zoo version"):
        zoo.parse_zoo_uri("zoo://v0/base")


@pytest.mark.slow
def test_builds_are_the_same_whatever_the_cpu_offers(tmp_path, monkeypatch):
    """The build's numerics are pinned (AVX2 code paths, one thread), so a machine whose MKL would pick its
    best kernels builds the same weights as one limited to AVX2 (unpinned, the two differ on an AVX-512
    machine after a few steps)."""
    digests = []
    for isa in ("AVX512", "AVX2"):
        if isa == "AVX2":  # MKL limited as on a CPU without AVX-512
            monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", isa)
        else:
            monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", isa.lower())  # the user's own setting is overridden
        path = zoo.build_zoo(tmp_path / isa, steps_scale=TINY, log=None, evaluate=False)
        manifest = json.loads((path / "zoo.json").read_text())
        assert manifest["numerics"]["pinned"] and manifest["numerics"]["env"]["MKL_CBWR"] == "AVX2,STRICT"
        digests.append(manifest["weights_sha256"])
    assert set(digests[0]) == set(zoo.ZOO_MODELS) and digests[0] == digests[1]
    from evomerge.zoo.build import weights_digest

    assert weights_digest(tmp_path / "AVX2" / path.name / "base") == digests[0]["base"]


def test_a_build_says_whether_it_made_the_reference_weights(tmp_path, monkeypatch, capsys):
    """The documented figures are those of one set of weights: a build that made others says so."""
    from evomerge.zoo.build import build_into

    recipe = zoo._recipe(TINY, zoo.ZOO_VERSION)
    name = zoo.zoo_path(tmp_path, steps_scale=TINY).name
    build_into(tmp_path / "a" / name, recipe, zoo.ZOO_VERSION, evaluate=False)
    first = json.loads((tmp_path / "a" / name / "zoo.json").read_text())
    assert first["reference"] == {"build": name, "status": "none", "differ": []}  # none filed for a tiny build
    capsys.readouterr()
    # filed with the script expert's digest altered: the same process builds the same weights again
    monkeypatch.setitem(zoo.REFERENCE_SHA256, name, {**first["weights_sha256"], "script": "0" * 64})
    build_into(tmp_path / "b" / f".{name}.tmp-1", recipe, zoo.ZOO_VERSION, evaluate=False)
    said = capsys.readouterr().out
    second = json.loads((tmp_path / "b" / f".{name}.tmp-1" / "zoo.json").read_text())
    assert second["weights_sha256"] == first["weights_sha256"]
    assert second["reference"] == {"build": name, "status": "differs", "differ": ["script"]}
    assert "zoo: warning: the weights of script are not the reference build's" in said
    monkeypatch.setitem(zoo.REFERENCE_SHA256, name, first["weights_sha256"])
    assert zoo.reference_check(name, first["weights_sha256"]) == ("same", [])
    # a build made earlier says it again from its zoo.json (`evomerge zoo build` on a cached zoo)
    assert zoo.built_reference_lines(tmp_path / "a" / name) == [
        "zoo: the same weights as the reference build (the figures in docs/benchmarks.md hold)"]
    assert zoo.built_reference_lines(tmp_path / "missing") == []
    # every filed reference names a build folder a shipped recipe makes, so a recipe change cannot orphan it
    shipped = {zoo.zoo_path(tmp_path, version=v).name for v in zoo.RECIPES}
    assert set(zoo.REFERENCE_SHA256) - {name} <= shipped
