"""The data-flow genome: decode, the in-memory path model, cache slots, export, lm-eval (CPU, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from evomerge.genomes import cost_measure, recipe_from_json  # noqa: E402
from evomerge.genomes.data_flow import DataFlowGenome, DataFlowGenomeSpec, DataFlowRecipe, read_block_count  # noqa: E402
from evomerge.genomes.data_flow.costs import path_length, path_params  # noqa: E402
from evomerge.genomes.data_flow.model import DataFlowError, DataFlowMaterializer  # noqa: E402
from evomerge.recipe import LayerGroup, Recipe  # noqa: E402
from tests.fixtures_models import make_tiny_llama_family  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_TASKS = ROOT / "search_spaces" / "demo_tasks"
L = 3  # blocks per tiny model


# Tiny matrices: extra threads only contend with the other processes on a small machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    from evomerge.zoo.modeling import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module")
def family(tmp_path_factory, tok):
    # Untied heads (like the zoo), experts far enough apart that a mixed path differs from either.
    root = tmp_path_factory.mktemp("fam")
    base, experts = make_tiny_llama_family(
        root, 2, scale=0.3, tie_word_embeddings=False, vocab_size=len(tok), num_hidden_layers=L
    )
    for d in (base, *experts):
        tok.save_pretrained(d)
    return base, experts


@pytest.fixture(scope="module")
def mat(family):
    _, (a, b) = family
    return DataFlowMaterializer([a, b])


def recipe(mat, path, scales=None, e=0, h=0):
    return DataFlowRecipe(
        models=mat.refs,
        num_layers=mat.num_layers,
        path=path,
        scales=scales if scales is not None else [1.0] * len(path),
        embed_source=e,
        head_source=h,
    )


MIXED = [(0, 0), (1, 1), (0, 1), (1, 1), (1, 2), (0, 1), (0, 2)]  # (1,1) and (0,1) repeat
MIXED_SCALES = [1.0, 0.8, 1.25, 0.9, 1.1, 0.7, 1.05]


def ids_and_mask(n=3, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as HFLM batches
    ids[1, :2] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------- genome


def test_decode_deterministic_pinned_and_named():
    g = DataFlowGenome(["m/a", "m/b"], [3, 2], repeats=2)
    assert (g.M, g.T) == (5, 10)
    assert g.dim == 10 + 2 * 5 and len(g.gene_names()) == g.dim == len(set(g.gene_names()))
    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.rand(g.dim, generator=rng).tolist()
        r1, r2 = g.decode(x), g.decode(list(x))
        assert r1 == r2 and r1.hash() == r2.hash()
        assert r1.path[0] == (0, 0) and r1.path[-1] == (0, 2)  # pinned: model A's first and last block
        assert len(r1.scales) == len(r1.path)
        assert all(0.5 <= s <= 1.5 for s in r1.scales)
        again = recipe_from_json(r1.canonical_json())
        assert isinstance(again, DataFlowRecipe) and again.hash() == r1.hash()
    # Nothing kept: only the pinned blocks; a gene of exactly 0.5 is not kept (keep means > 0.5).
    r = g.decode([0.5] * g.dim)
    assert r.path == [(0, 0), (0, 2)] and r.scales == [1.0, 1.0]
    # Slots run in layout order across repetitions; out-of-cube genes are clipped.
    x = [0.0] * g.T + [g.unit_scale_gene()] * g.n_scale_genes
    x[4] = 2.0  # rep 0, (1, 1)
    x[5 + 3] = 0.9  # rep 1, (1, 0)
    assert g.decode(x).path == [(0, 0), (1, 1), (1, 0), (0, 2)]
    # The scale of a step comes from the gene named after (source of the incoming state, target).
    names = g.gene_names()
    x[names.index("scale/from_m1/m1.L0")] = 1.0
    x[names.index("scale/from_m0/m1.L1")] = 0.0
    assert g.decode(x).scales == [1.0, 0.5, 1.5, 1.0]
    unpinned = DataFlowGenome(["a", "b"], [3, 2], repeats=1, pin_first=False, pin_last=False, scales="none")
    assert unpinned.dim == 5 and unpinned.decode([0.0] * 5).path == []
    assert DataFlowGenome(["a", "b"], [3, 2], scales="full").n_scale_genes == 6 * 5
    assert DataFlowGenome(["a", "b"], [3, 2], scales="per_layer").n_scale_genes == 5


def test_encode_model_is_the_model_and_spec_validates():
    g = DataFlowGenome(["a", "b"], [4, 4], repeats=2, embed_source=1, head_source=1)
    r = g.decode(g.encode_model(1, keep=0.6, drop=0.4))
    assert r.path == [(1, i) for i in range(4)] and r.scales == [1.0] * 4
    space = yaml.safe_load((ROOT / "search_spaces" / "dfs_demo.yaml").read_text())
    spec = DataFlowGenomeSpec.model_validate(space["genome"])
    dg = DataFlowGenome.from_spec(spec, space["models"], [4, 4])
    assert dg.dim == 16 + 16 and dg.decode([0.5] * dg.dim).path == [(0, 0), (0, 3)]
    with pytest.raises(ValueError, match="embed_source"):
        DataFlowGenomeSpec(embed_source=2).check_models(2)
    with pytest.raises(ValueError):
        DataFlowGenomeSpec.model_validate({"type": "data_flow", "scale_bounds": [1.0, 1.0]})
    with pytest.raises(ValueError, match="not a block"):
        DataFlowRecipe(models=["a"], num_layers=[2], path=[(0, 2)], scales=[1.0])


# ---------------------------------------------------------------------------------------- model


def test_identity_path_is_bit_identical(family, mat):
    from transformers import AutoModelForCausalLM

    _, (a, b) = family
    ids, mask = ids_and_mask()
    model = mat.new_model()
    for m, ref_path in ((0, a), (1, b)):
        g = DataFlowGenome(mat.refs, mat.num_layers, embed_source=m, head_source=m)
        mat.apply(g.decode(g.encode_model(m)), model)
        ref = AutoModelForCausalLM.from_pretrained(ref_path).eval()
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
    assert path_length(model) == L
    # No weight was copied: the candidate's blocks are the resident source modules.
    assert model.model.blocks[0] is mat.sources[1].model.layers[0]


def test_generate_with_cache_equals_without_for_repeated_blocks(mat):
    model = mat.new_model(recipe(mat, MIXED, MIXED_SCALES, e=0, h=1))
    ids, mask = ids_and_mask()
    kw = dict(
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        plain = model.generate(ids, use_cache=False, **kw)
        # One cache slot per step, each holding the whole sequence.
        out = model(ids, attention_mask=mask, use_cache=True)
    assert torch.equal(cached.sequences, plain.sequences)
    for x, y in zip(cached.logits, plain.logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert len(out.past_key_values.layers) == len(MIXED)
    assert all(layer.keys.shape[-2] == ids.shape[1] for layer in out.past_key_values.layers)
    # The path really mixes models and scales: it differs from the embed source alone.
    with torch.no_grad():
        mixed = model(ids).logits
        mat.apply(recipe(mat, [(0, 0), (0, 1), (0, 2)]), model)
        assert not torch.allclose(mixed, model(ids).logits)


def test_costs(mat):
    model = mat.new_model()
    r = recipe(mat, MIXED, MIXED_SCALES)
    mat.apply(r, model)
    blocks = {(m, layer) for m, layer in MIXED}
    per_block = sum(p.numel() for p in mat.sources[0].model.layers[0].parameters())
    emb = mat.sources[0].model.embed_tokens.weight.numel()
    expect = 2 * emb + len(blocks) * per_block + mat.sources[0].model.norm.weight.numel()
    assert path_params(model) == mat.param_count(r) == expect
    assert path_length(model) == cost_measure(model, "path_length") == len(MIXED)
    with pytest.raises(ValueError, match="unknown cost measure"):
        cost_measure(model, "latency")
    with pytest.raises(DataFlowError, match="block counts"):
        mat.apply(DataFlowRecipe(models=mat.refs, num_layers=[2, 2], path=[], scales=[]), model)


# ---------------------------------------------------------------------------------------- export


def test_export_round_trip(mat, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from evomerge.genomes import ExportCard
    from evomerge.genomes.data_flow.export import dataflow_model_card, save_dataflow

    r = recipe(mat, MIXED, MIXED_SCALES, e=0, h=1)
    model = mat.new_model(r)
    card = dataflow_model_card(r, ExportCard("s", 3, {"arith": 0.5}, [{"name": "arith", "direction": "maximize"}]))
    out = save_dataflow(r, mat, tmp_path / "dfs", readme=card)
    assert (out / "modeling_evomerge_dataflow.py").is_file() and (out / "tokenizer.json").is_file()
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    tensors = load_file(str(out / "model.safetensors"))
    n_blocks = len({k.split(".")[2] for k in tensors if k.startswith("model.blocks.")})
    assert n_blocks == len(r.unique_blocks()) == 5  # repeated blocks saved once
    assert json.loads((out / "evomerge_recipe.json").read_text())["path"] == [list(s) for s in MIXED]
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert loaded.config.dfs_path == model.config.dfs_path
    ids, mask = ids_and_mask(seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
        assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))
    assert path_params(loaded) == mat.param_count(r)
    with pytest.raises(ValueError):  # no silent plain-Llama load without the flag
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_tied_head_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.genomes.data_flow.export import save_dataflow

    _, (a, b) = make_tiny_llama_family(tmp_path / "fam", 2, scale=0.3)  # tied embeddings and head
    dm = DataFlowMaterializer([a, b])
    ids = torch.tensor([[1, 7, 3, 9, 2]])
    for e, h in ((0, 0), (1, 0)):
        r = DataFlowRecipe(
            models=[a, b],
            num_layers=[L, L],
            path=[(0, 0), (1, 1), (1, 1), (0, 2)],
            scales=[1.0, 0.9, 1.1, 1.0],
            embed_source=e,
            head_source=h,
        )
        model = dm.new_model(r)
        loaded = AutoModelForCausalLM.from_pretrained(
            save_dataflow(r, dm, tmp_path / f"o{e}{h}"), trust_remote_code=True
        ).eval()
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (e == h)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_ps_result_as_source(family, tmp_path, monkeypatch):
    from evomerge.merge import Materializer

    base, (a, b) = family
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(tmp_path / "cache"))
    n = L + 2
    ps = Recipe(
        base=base,
        sources=[a, b],
        method="linear",
        groups=[
            LayerGroup(name="all", kind="blocks", start=0, stop=L, weights=[0.5, 0.5]),
            LayerGroup(name="embed", kind="embed", weights=[0.5, 0.5]),
            LayerGroup(name="head", kind="head", weights=[0.5, 0.5]),
        ],
    )
    assert len(ps.groups) + L - 1 == n
    rj = tmp_path / "ps.json"
    rj.write_text(ps.canonical_json())
    exported = Materializer(base, [a, b]).save_merged(ps, tmp_path / "exported")
    assert read_block_count(str(rj)) == L  # read from the PS base, nothing built yet
    assert not (tmp_path / "cache").exists()
    dm = DataFlowMaterializer.from_refs([str(rj), str(exported), b])
    assert dm.model_paths[0] != str(rj) and Path(dm.model_paths[0], "config.json").is_file()
    for i in (0, 1):  # the recipe JSON and the exported folder give the same model
        torch.testing.assert_close(
            dm.sources[i].model.layers[1].mlp.up_proj.weight,
            dm.sources[0].model.layers[1].mlp.up_proj.weight,
            atol=0,
            rtol=0,
        )
    r = DataFlowRecipe(models=dm.refs, num_layers=dm.num_layers, path=[(0, 0), (2, 1), (0, 2)], scales=[1, 1, 1])
    assert r.models[0] == str(rj)
    with torch.no_grad():
        assert torch.isfinite(dm.new_model(r)(torch.tensor([[1, 5, 6]])).logits).all()


# ---------------------------------------------------------------------------------------- lm-eval


def test_hflm_evaluator_on_demo_tasks(mat, tok, tmp_path):
    from evomerge.genomes import cost_measure
    from evomerge.genomes.base import nonzero_params as count_nonzero_params
    from evomerge.objectives import Evaluator
    from evomerge.space import Objective
    from evomerge.zoo.modeling import greedy_accuracy
    from evomerge.zoo.tasks import Example

    objs = [
        Objective(name="arith", task="demo_arith_search", metric="exact_match,none", limit=4),
        Objective(name="script", task="demo_script_search", metric="exact_match,none", limit=4),
        Objective(name="size", kind="cost", measure="params", direction="minimize"),
    ]
    ev = Evaluator(objs, [str(DEMO_TASKS)], tok, batch_size=4, cache_dir=str(tmp_path / "c"), measure=cost_measure)
    model = mat.new_model()
    for path in (MIXED, [(0, 0), (0, 2)]):  # the same model object, re-wired in place
        mat.apply(recipe(mat, path, [1.0] * len(path)), model)
        res = ev.evaluate(model)
        for name, data in (("arith", "arith_search"), ("script", "script_search")):
            # each verdict is what the zoo's own greedy decoder says of this wired model and example
            rows = [json.loads(line) for line in (DEMO_TASKS / "data" / f"{data}.jsonl").read_text().splitlines()[:4]]
            want = [greedy_accuracy(model, tok, [Example(name, r["prompt"], r["target"])]) for r in rows]
            assert res[name].samples == want and res[name].value == pytest.approx(sum(want) / 4)
        assert res["size"].value == count_nonzero_params(model) <= path_params(model)
    assert res["size"].value < mat.param_count(recipe(mat, MIXED))
