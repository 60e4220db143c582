"""Space validation, genome decoding and recipe hashing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.genomes.parameter_space import ParameterSpaceGenome, plan_groups
from evomerge.recipe import Recipe, tensor_slot
from evomerge.space import SpaceError, dump_space, load_space, parse_space_text


def write(tmp_path: Path, text: str) -> Path:
    """The space file, beside the model folders and the tasks it names (a space is checked against them)."""
    for m in ("base", "a", "b"):
        (tmp_path / m).mkdir(exist_ok=True)
        cfg = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 4, "vocab_size": 16}
        (tmp_path / m / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "tasks").mkdir(exist_ok=True)
    for t in ("t1", "t2"):
        (tmp_path / "tasks" / f"{t}.yaml").write_text(f"task: {t}\n")
    if "evaluation: {" in text:
        text = text.replace("evaluation: {", "evaluation: {task_paths: [tasks], ", 1)
    else:
        text += "evaluation: {task_paths: [tasks]}\n"
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


GOOD = """
base_model: base
models: [a, b]
genome: {method: dare_ties, layer_groups: 2, num_layers: 4}
objectives:
  - {name: x, task: t1, metric: "exact_match,none"}
  - {name: y, task: t2, metric: "exact_match,none", direction: minimize}
budget: 10
"""


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (GOOD.replace("budget: 10", "budget: -1"), "budget"),
        (GOOD.replace("models: [a, b]", "models: []"), "models"),
        (GOOD.replace("method: dare_ties", "method: magic"), "genome.method"),
        (GOOD.replace("budget: 10", "budget: 10\nbugdet: 3"), "bugdet"),
        (GOOD.replace(', metric: "exact_match,none"}', "}", 1), "objectives.0"),
        (GOOD.replace("layer_groups: 2", "layer_groups: 0"), "genome.layer_groups"),
    ],
)
def test_bad_space_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(SpaceError) as e:
        load_space(write(tmp_path, text))
    msg = str(e.value)
    assert f"field '{field}" in msg
    assert "\n" not in msg


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(write(tmp_path, "a: [b"))
    with pytest.raises(SpaceError, match="no such file"):
        load_space(tmp_path / "nope.yaml")


def test_portable_space_round_trip(tmp_path: Path) -> None:
    sp = load_space(write(tmp_path, GOOD))
    again = parse_space_text(dump_space(sp))
    assert again.base_model == str((tmp_path / "base").resolve())
    assert again.models[0] == str((tmp_path / "a").resolve())
    assert again.objectives == sp.objectives


def test_groups_cover_every_block_once() -> None:
    for n_layers, groups in [(4, 1), (4, 2), (5, 2), (7, 3), (4, "block"), (3, 9)]:
        plans = plan_groups(n_layers, groups)
        covered = [i for p in plans if p.kind == "blocks" for i in range(p.start, p.stop)]
        assert covered == list(range(n_layers))
        assert plans[0].kind == "embed" and plans[-1].kind == "head"


def test_decode_maps_unit_cube_onto_bounds(tmp_path: Path) -> None:
    text = GOOD.replace("layer_groups: 2,", "layer_groups: 2, weight_bounds: [0.0, 2.0], density_bounds: [0.2, 1.0],")
    sp = load_space(write(tmp_path, text))
    g = ParameterSpaceGenome(sp)
    assert g.dim == 4 * 2 * 2 == len(g.gene_names())
    r = g.decode([0.5] * g.dim)
    assert all(w == pytest.approx(1.0) for grp in r.groups for w in grp.weights)
    assert all(d == pytest.approx(0.6) for grp in r.groups for d in grp.densities)
    # Out-of-cube genes are clipped, not rejected (CMA-ES samples outside the box).
    r2 = g.decode([-3.0, 7.0] * (g.dim // 2))
    assert r2.groups[0].weights[0] == 0.0 and r2.groups[0].densities[0] == 1.0
    with pytest.raises(ValueError):
        g.decode([0.5])


def test_recipe_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    sp = load_space(write(tmp_path, GOOD))
    g = ParameterSpaceGenome(sp)
    x = [0.3] * g.dim
    r = g.decode(x)
    assert Recipe.from_json(r.canonical_json()).hash() == r.hash()
    assert g.decode(x).hash() == r.hash()
    x[3] = 0.31
    assert g.decode(x).hash() != r.hash()
    assert json.loads(r.canonical_json())["method"] == "dare_ties"


def test_tensor_slots_and_group_lookup(tmp_path: Path) -> None:
    assert tensor_slot("model.embed_tokens.weight") == "embed"
    assert tensor_slot("model.layers.3.mlp.up_proj.weight") == 3
    assert tensor_slot("model.norm.weight") == "head"
    assert tensor_slot("lm_head.weight") == "head"
    r = ParameterSpaceGenome(load_space(write(tmp_path, GOOD))).decode([0.5] * 16)
    assert r.group_for("model.layers.1.self_attn.q_proj.weight").name == "layers.0-1"
    assert r.group_for("model.layers.2.self_attn.q_proj.weight").name == "layers.2-3"
    assert r.group_for("lm_head.weight").name == "head"


def test_hub_base_needs_num_layers(tmp_path: Path) -> None:
    text = GOOD.replace(", num_layers: 4", "").replace("base_model: base", "base_model: org/base")
    sp = load_space(write(tmp_path, text))
    with pytest.raises(SpaceError, match="genome.num_layers"):
        ParameterSpaceGenome(sp)


def test_model_granularity_is_one_gene_set_for_every_tensor(tmp_path: Path) -> None:
    sp = load_space(write(tmp_path, GOOD.replace("layer_groups: 2", "layer_groups: model")))
    g = ParameterSpaceGenome(sp)
    assert g.dim == 2 * 2  # two models x (weight, density)
    r = g.decode([0.1, 0.2, 0.3, 0.4])
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight", "lm_head.weight"):
        assert r.group_for(name).name == "all"


def test_fused_kernels_option(tmp_path: Path) -> None:
    sp = load_space(write(tmp_path, GOOD))
    assert sp.evaluation.fused_kernels == "auto"  # on for CUDA workers, off for CPU ones
    on = load_space(write(tmp_path, GOOD + "evaluation: {fused_kernels: 'on'}\n"))
    assert on.evaluation.fused_kernels == "on"
    # Unquoted on/off are YAML booleans; they mean what they say.
    for text, value in (("on", "on"), ("off", "off"), ("true", "on"), ("auto", "auto")):
        sp2 = load_space(write(tmp_path, GOOD + f"evaluation: {{fused_kernels: {text}}}\n"))
        assert sp2.evaluation.fused_kernels == value
    # The stored space keeps the setting, and a space stored before the option existed still loads.
    assert parse_space_text(dump_space(on)).evaluation.fused_kernels == "on"
    old = yaml.safe_load(dump_space(sp))
    del old["evaluation"]["fused_kernels"]
    assert parse_space_text(yaml.safe_dump(old)).evaluation.fused_kernels == "auto"


@pytest.mark.parametrize("value", ["'yes'", "fast", "1"])
def test_bad_fused_kernels_names_the_field(tmp_path: Path, value: str) -> None:
    with pytest.raises(SpaceError) as e:
        load_space(write(tmp_path, GOOD + f"evaluation: {{fused_kernels: {value}}}\n"))
    msg = str(e.value)
    assert "field 'evaluation.fused_kernels'" in msg and "'auto', 'on' or 'off'" in msg
    assert "\n" not in msg


def test_worker_config_carries_fused_kernels(tmp_path: Path) -> None:
    from evomerge.run import worker_config

    sp = load_space(write(tmp_path, GOOD + "evaluation: {fused_kernels: 'off'}\n"))
    assert worker_config(sp).fused == "off"
    assert worker_config(load_space(write(tmp_path, GOOD))).fused == "auto"
