"""One-off merges and interop: mergekit YAML in, mergekit YAML out, LoRA adapters as sources."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.merge import Materializer, load_state_dict
from evomerge.merge.build import build_state_dict
from evomerge.merge.mergekit_export import dump_mergekit_yaml, recipe_to_mergekit
from evomerge.merge.mergekit_io import load_merge_config, mergekit_to_recipe
from evomerge.merge.mergekit_settings import ConfigError, evaluate_setting
from evomerge.recipe import LayerGroup, Recipe

try:
    from fixtures_models import make_tiny_llama_family
except ImportError:  # tests/ collected as a package
    from tests.fixtures_models import make_tiny_llama_family

N = 4  # blocks of the tiny models
ATOL = 2e-6


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    base, experts = make_tiny_llama_family(root, n_experts=2, seed=0, tie_word_embeddings=False, num_hidden_layers=N)
    return root, base, experts


@pytest.fixture(scope="module")
def mat(fam):
    _, base, experts = fam
    return Materializer(base, experts)


def _models(experts, params):
    return [{"model": e, "parameters": p} for e, p in zip(experts, params, strict=True)]


def _close(a: dict, b: dict, atol=ATOL):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        d = (a[k].float() - b[k].float()).abs().max().item()
        assert d <= atol, (k, d)


def test_evaluate_setting_matches_mergekit():
    import mergekit.config as mk

    cases = [
        (0.5, "x", 0.3),
        ([0.0, 1.0], "x", 0.25),
        ([0.1, 0.9, 0.3], "x", 0.75),
        ([{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}], "model.layers.1.self_attn.q_proj.weight", 0.5),
        ([{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}], "model.layers.1.mlp.up_proj.weight", 0.5),
    ]
    for setting, name, t in cases:
        ref = mk.evaluate_setting(name, _mk(mk, setting), t, validate=float)
        assert evaluate_setting(setting, name, t) == pytest.approx(ref)


def _mk(mk, setting):
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        return [mk.ConditionalParameter.model_validate(c) for c in setting]
    return setting


def test_linear_and_task_arithmetic_translate_to_plain_recipes(fam, mat):
    _, base, experts = fam
    job = mergekit_to_recipe({"merge_method": "linear", "models": _models(experts, [{"weight": 0.3}, {"weight": 0.9}])})
    r = job.recipe
    assert r.method == "linear" and r.params == {"normalize": True} and r.slices is None
    assert len(r.groups) == 3 and all(g.weights == [0.3, 0.9] for g in r.groups)
    job = mergekit_to_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"lambda": 0.7},
            "models": _models(experts, [{"weight": 0.6}, {"weight": 0.8}]) + [{"model": base}],
        }
    )
    r = job.recipe
    assert r.sources == [str(Path(e).resolve()) for e in experts] and r.base == str(Path(base).resolve())
    assert r.params == {"normalize": False, "lambda": 0.7}  # mergekit's default normalize written out
    ours = mat.merged_state_dict(r)
    sd0 = mat.base
    tau = {k: v for k, v in mat.deltas.items()}
    for k in ours:
        exp = sd0[k] + 0.7 * (0.6 * tau[k][0] + 0.8 * tau[k][1])
        torch.testing.assert_close(ours[k], exp, rtol=0, atol=1e-6)


def test_gradients_and_filters(fam):
    _, base, experts = fam
    cfg = {
        "merge_method": "dare_ties",
        "base_model": base,
        "parameters": {"normalize": True},
        "models": _models(
            experts,
            [
                {"weight": [0.2, 0.8], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]},
                {"weight": 0.5, "density": 0.5},
            ],
        ),
    }
    r = mergekit_to_recipe(cfg).recipe
    assert r.params == {"normalize": True, "rescale": "l1", "lambda": 1.0}
    names = load_state_dict(base).keys()
    for n in names:
        g = r.group_for(n)
        slot = n.split(".")[2] if ".layers." in n else None
        t = int(slot) / (N - 1) if slot is not None else 0.0
        assert g.weights[0] == pytest.approx(0.2 + 0.6 * t)
        assert g.densities == pytest.approx([0.3 if "mlp" in n else 0.7, 0.5])
    assert any(g.filter == "mlp" for g in r.groups)
    # per-block groups: embed, 4 blocks x (mlp filter + default), head
    assert len([g for g in r.groups if g.kind == "blocks"]) == 2 * N


def test_hash_of_old_recipes_unchanged():
    r = Recipe(
        base="b",
        sources=["x", "y"],
        method="ties",
        params={"lambda": 1.0},
        seed=4,
        groups=[
            LayerGroup(name="e", kind="embed", weights=[0.5, 0.3], densities=[0.2, 0.9]),
            LayerGroup(name="b", kind="blocks", start=0, stop=3, weights=[1.0, 2.0]),
            LayerGroup(name="h", kind="head", weights=[0.1, 0.2]),
        ],
    )
    assert r.hash() == "e23369948c00524c"
    assert "filter" not in r.canonical_json() and "slices" not in r.canonical_json()
    r2 = r.model_copy(
        update={"groups": [*r.groups[:1], r.groups[1].model_copy(update={"filter": "mlp"}), *r.groups[1:]]}
    )
    assert r2.hash() != r.hash()


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"merge_method": "ties", "models": [], "tokenizer": {"source": "base"}}, "tokenizer"),
        ({"merge_method": "nuslerp", "models": [{"model": "."}]}, "merge_method"),
        ({"merge_method": "ties", "modules": {}}, "modules"),
        ({"merge_method": "ties", "base_model": "org/some-model", "models": [{"model": "."}]}, "base_model"),
        (
            {
                "merge_method": "task_arithmetic",
                "base_model": "BASE",
                "models": [{"model": "E0", "parameters": {"weight": 1, "foo": 2}}],
            },
            "models[0].parameters.foo",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "E0", "layer_range": [0, 2]}], "residual_weight": 0.5}],
            },
            "slices[0].residual_weight",
        ),
        ({"merge_method": "task_arithmetic", "models": [{"model": "E0", "parameters": {"weight": 1}}]}, "base_model"),
    ],
)
def test_unsupported_fields_name_the_field(fam, cfg, field):
    _, base, experts = fam
    text = json.dumps(cfg).replace('"BASE"', json.dumps(base)).replace('"E0"', json.dumps(experts[0]))
    with pytest.raises(ConfigError) as ei:
        mergekit_to_recipe(json.loads(text))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(field), msg


def test_passthrough_slices_stack_layers(fam, tmp_path):
    _, base, experts = fam
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": experts[0], "layer_range": [0, 3]}]},
            {"sources": [{"model": experts[1], "layer_range": [1, 4]}]},
        ],
    }
    r = mergekit_to_recipe(cfg).recipe
    assert r.slices is not None and [s.n_layers for s in r.slices] == [3, 3]
    sd, conf = build_state_dict(r)
    assert conf["num_hidden_layers"] == 6
    a, b = load_state_dict(experts[0]), load_state_dict(experts[1])
    assert torch.equal(sd["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(sd["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(sd["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(sd["model.layers.3.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(sd["model.layers.5.mlp.down_proj.weight"], b["model.layers.3.mlp.down_proj.weight"])
    _close(sd, _run_mergekit({**cfg, "dtype": "float32"}, tmp_path / "mk"), atol=0)
    # a passthrough of one whole model is bit-exact
    one = mergekit_to_recipe({"merge_method": "passthrough", "models": [{"model": experts[1]}]}).recipe
    sd1, _ = build_state_dict(one)
    assert all(torch.equal(sd1[k], b[k]) for k in b)


def test_aligned_slices_match_mergekit(fam, tmp_path):
    """Two slices with per-slice gradients and a per-slice lambda: per-block groups, mergekit's tensors."""
    _, base, experts = fam
    src = lambda a, b: (  # noqa: E731
        [{"model": base, "layer_range": [a, b]}]
        + [  # noqa: E731
            {"model": e, "layer_range": [a, b], "parameters": {"weight": [0.2, 0.9], "density": 0.5}} for e in experts
        ]
    )
    cfg = {"merge_method": "ties", "base_model": base, "dtype": "float32",
           "slices": [{"sources": src(0, 2)}, {"sources": src(2, 4), "parameters": {"lambda": 0.5}}]}  # fmt: skip
    r = mergekit_to_recipe(cfg).recipe
    assert r.slices is None
    assert {g.params["lambda"] for g in r.groups if g.kind == "blocks" and g.start >= 2} == {0.5}
    ours, _ = build_state_dict(r)  # group params
    _close(ours, _run_mergekit(cfg, tmp_path / "mk"))


def test_sliced_build_equals_materializer(fam, mat):
    """A layer-stacking recipe whose slices keep every block in place builds through per-slice lazy
    materializers over renamed views: the resident Materializer's tensors exactly, DARE draws included."""
    from evomerge.recipe import LayerSlice, SliceSource

    _, base, experts = fam
    h = N // 2
    for method, dens in [("ties", [0.4, 0.6]), ("dare_ties", [0.5, 0.7]), ("dare", [0.3, 1.0])]:
        r = Recipe(
            base=base, sources=experts, method=method, seed=7,
            groups=[LayerGroup(name="all_e", kind="embed", weights=[0.7, 0.4], densities=dens),
                    LayerGroup(name="b0", kind="blocks", start=0, stop=h, weights=[0.5, 1.1], densities=dens),
                    LayerGroup(name="b1", kind="blocks", start=h, stop=N, weights=[0.2, 0.9], densities=dens),
                    LayerGroup(name="h", kind="head", weights=[0.3, 0.3], densities=dens)],
        )  # fmt: skip
        srcs = lambda a, b: [SliceSource(model=m, start=a, stop=b) for m in [base, *experts]]  # noqa: E731
        g = r.groups
        sliced = r.model_copy(update={"groups": [], "slices": [
            LayerSlice(sources=srcs(0, h), groups=[g[0], g[1]]),
            LayerSlice(sources=srcs(h, N), groups=[g[2].model_copy(update={"start": 0, "stop": N - h}), g[3]]),
        ]})  # fmt: skip
        ours, conf = build_state_dict(sliced)
        assert conf["num_hidden_layers"] == N
        ref = mat.merged_state_dict(r)
        assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_cli_merge_yaml_and_recipe(fam, tmp_path, mat):
    import typer
    from typer.testing import CliRunner

    from evomerge.merge_cli import merge_command

    _, base, experts = fam
    app = typer.Typer()
    app.command("merge")(merge_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    cfg = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "models": _models(experts, [{"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.3}]),
    }
    y = tmp_path / "ties.yml"
    y.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out_yaml"
    res = runner.invoke(app, ["merge", str(y), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file() and (out / "mergekit_config.yml").is_file()
    got = load_state_dict(out)
    r = load_merge_config(y).recipe
    _close(got, mat.merged_state_dict(r))
    # the recipe JSON written beside the model rebuilds it
    out2 = tmp_path / "out_json"
    res = runner.invoke(app, ["merge", str(out / "evomerge_recipe.json"), "--out", str(out2)])
    assert res.exit_code == 0, res.output
    _close(load_state_dict(out2), got, atol=0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out2)
    # a non-empty output folder and an unsupported field: one-line error, exit code 2
    res = runner.invoke(app, ["merge", str(y), "--out", str(out)])
    assert res.exit_code == 2 and "error:" in res.output and "not empty" in res.output
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({**cfg, "chat_template": "chatml"}))
    res = runner.invoke(app, ["merge", str(bad), "--out", str(tmp_path / "o3")])
    assert res.exit_code == 2 and "error: chat_template" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o3").exists()
    # a device this process cannot use: one line, nothing written
    for dev, why in (("tpu", "--device must be"), ("cuda", "no CUDA device")):
        if dev == "cuda" and torch.cuda.is_available():
            continue  # (on a GPU machine cuda is a valid choice)
        res = runner.invoke(app, ["merge", str(y), "--out", str(tmp_path / "o4"), "--device", dev])
        assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "o4").exists()


def _run_mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    conf = MergeConfiguration.model_validate(yaml.safe_load(dump_mergekit_yaml(cfg)))
    run_merge(conf, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    return load_state_dict(out)


def test_export_round_trip_through_mergekit(fam, mat, tmp_path):
    _, base, experts = fam
    names = list(load_state_dict(base))
    groups = [LayerGroup(name="embed", kind="embed", weights=[0.9, 0.1], densities=[0.8, 0.6])]
    for i in range(N):
        groups.append(LayerGroup(name=f"mlp{i}", kind="blocks", start=i, stop=i + 1, filter="mlp",
                                 weights=[0.3 + 0.1 * i, 0.5], densities=[0.4, 0.9 - 0.1 * i]))  # fmt: skip
        groups.append(
            LayerGroup(name=f"b{i}", kind="blocks", start=i, stop=i + 1, weights=[0.2 * i, 0.7], densities=[0.5, 0.5])
        )
    groups.append(LayerGroup(name="head", kind="head", weights=[0.4, 0.6], densities=[1.0, 0.3]))
    for method, params in [("ties", {"normalize": False, "lambda": 0.8}), ("task_arithmetic", {"lambda": 1.2})]:
        g2 = groups if method == "ties" else [g.model_copy(update={"densities": None}) for g in groups]
        r = Recipe(base=base, sources=experts, method=method, params=params, groups=g2)
        cfg = recipe_to_mergekit(r)
        assert cfg is not None and cfg["parameters"]["normalize"] is False
        ours, _ = build_state_dict(r)
        assert set(ours) == set(names)  # the groups cover every tensor of the base: none left out
        theirs = _run_mergekit(cfg, tmp_path / method)
        _close(ours, {k: theirs[k] for k in ours})
        # and back: the emitted YAML translates to a recipe with the same tensors
        back = mergekit_to_recipe(cfg).recipe
        _close(build_state_dict(back)[0], ours, atol=1e-6)
    # DARE with evomerge's 1/density rescale and some density < 1: not expressible in mergekit 0.1.5
    r = Recipe(base=base, sources=experts, method="dare_ties", groups=groups)
    assert recipe_to_mergekit(r) is None
    assert recipe_to_mergekit(r.model_copy(update={"params": {"rescale": "l1"}}))["parameters"]["rescale"] is True


def test_lora_delta_equals_merge_and_unload(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from evomerge.merge.lora import load_lora_delta, source_state_dict

    base, _ = make_tiny_llama_family(tmp_path, n_experts=0, seed=3, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(base)
    for rslora in (False, True):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=rslora,
                              rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 3})  # fmt: skip
        pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        ad = tmp_path / f"adapter{int(rslora)}"
        pm.save_pretrained(ad)
        merged = pm.merge_and_unload().state_dict()
        base_sd = load_state_dict(base)
        delta = load_lora_delta(ad, base_sd)
        assert len(delta) == 2 * 3  # 2 layers x 3 modules
        for k, b in base_sd.items():
            exp = merged[k] - b
            got = delta.get(k, torch.zeros_like(b))
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
        full = source_state_dict(ad, base_sd)
        torch.testing.assert_close(
            full["model.layers.1.self_attn.q_proj.weight"], merged["model.layers.1.self_attn.q_proj.weight"]
        )
        assert source_state_dict(base, base_sd).keys() == base_sd.keys()
    del model
    # an adapter as a merge source, in a mergekit YAML (task arithmetic of the LoRA's task vector)
    job = mergekit_to_recipe({"merge_method": "task_arithmetic", "base_model": base,
                              "models": [{"model": str(ad), "parameters": {"weight": 0.5}}]})  # fmt: skip
    sd, _ = build_state_dict(job.recipe)
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(sd[k], base_sd[k] + 0.5 * delta[k], rtol=0, atol=1e-6)


def test_materializer_takes_lora_sources_and_filter_groups(tmp_path):
    """A LoRA adapter is a source of the resident Materializer (its task vector is B·A·scale), and a
    recipe group with a tensor-name filter applies to the matching tensors only."""
    import peft
    from transformers import AutoModelForCausalLM

    from evomerge.merge import Materializer
    from evomerge.recipe import LayerGroup, Recipe

    base, (expert,) = make_tiny_llama_family(tmp_path, n_experts=1, seed=5, num_hidden_layers=2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ad = tmp_path / "adapter"
    pm.save_pretrained(ad)
    merged_dir = tmp_path / "merged"
    pm.merge_and_unload().save_pretrained(merged_dir)

    recipe = Recipe(
        base=str(base),
        sources=[str(ad), str(expert)],
        method="task_arithmetic",
        groups=[
            LayerGroup(name="mlp", kind="all", filter="mlp", weights=[1.0, 0.0]),
            LayerGroup(name="rest", kind="all", weights=[0.5, 1.0]),
        ],
    )
    got = Materializer(str(base), [str(ad), str(expert)]).merged_state_dict(recipe)
    ref_recipe = recipe.model_copy(update={"sources": [str(merged_dir), str(expert)]})
    want = Materializer(str(base), [str(merged_dir), str(expert)]).merged_state_dict(ref_recipe)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    base_sd, lora_sd = load_state_dict(base), load_state_dict(merged_dir)
    up = "model.layers.0.mlp.up_proj.weight"  # filter group: the adapter's full delta, no expert
    torch.testing.assert_close(got[up], lora_sd[up], rtol=1e-5, atol=1e-6)
    q = "model.layers.1.self_attn.q_proj.weight"  # other tensors: half the adapter, all the expert
    exp_sd = load_state_dict(expert)
    torch.testing.assert_close(
        got[q], base_sd[q] + 0.5 * (lora_sd[q] - base_sd[q]) + (exp_sd[q] - base_sd[q]), rtol=1e-5, atol=1e-6
    )


def test_merge_process_reads_config_json_without_transformers(fam, tmp_path):
    """`evomerge merge` is timed whole-process against mergekit-yaml, and importing transformers' config
    classes costs about 2 s: the merge reads config.json itself and writes the base's, dtype set."""
    _, base, experts = fam
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "dtype": "bfloat16",
        "models": _models(experts, [{"weight": 0.5}, {"weight": 0.3}]),
    }
    y = tmp_path / "ta.yml"
    y.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    code = (
        f"import sys; sys.argv = ['evomerge', 'merge', {str(y)!r}, '--out', {str(out)!r}]\n"
        "from evomerge.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('transformers' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False"
    base_cfg = json.loads((Path(base) / "config.json").read_text())
    assert base_cfg.get("dtype") != "bfloat16"
    assert json.loads((out / "config.json").read_text()) == {**base_cfg, "dtype": "bfloat16"}
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    # a base folder without config.json: one line, exit code 2, nothing written
    nocfg = tmp_path / "nocfg"
    shutil.copytree(base, nocfg)
    (nocfg / "config.json").unlink()
    y.write_text(yaml.safe_dump({**cfg, "base_model": str(nocfg)}))
    p = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "merge", str(y), "--out", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "no config.json" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()
