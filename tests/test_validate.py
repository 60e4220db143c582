"""A space that cannot run is refused before anything is created: models, tasks, scorers, bounds.

Each bad space is refused by ``load_space`` with one SpaceError line naming the field, by ``evomerge
validate`` with exit 2 and one line, and ``evomerge search`` on it leaves no study in the database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures_models import make_tiny_llama_family  # noqa: E402

from evomerge.space import SpaceError, load_space  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"

GOOD = """
base_model: models/base
models: [models/expert0]
genome: {method: dare_ties, layer_groups: 2}
objectives:
  - {name: t, task: t, metric: "exact_match,none"}
  - {name: py, kind: python, scorer: "scorer.py:score"}
report:
  - {name: r, task: tasks/t.yaml, metric: "exact_match,none"}
evaluation: {task_paths: [tasks]}
budget: 4
"""

DFS = """
models: [models/base, models/expert0]
genome: {type: data_flow, repeats: 1, scales: per_layer}
objectives:
  - {name: t, task: t, metric: "exact_match,none"}
evaluation: {task_paths: [tasks]}
budget: 4
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("validate"))


def make_root(d: Path) -> Path:
    """A folder with a tiny base and expert, models of other shapes, a task and a scorer file."""
    make_tiny_llama_family(d / "models", n_experts=1)
    wide, _ = make_tiny_llama_family(d / "w", n_experts=0, hidden_size=16)
    (d / "w" / "base").rename(d / "models" / "wide")  # hidden_size differs: the configs say so
    fat, _ = make_tiny_llama_family(d / "f", n_experts=0, intermediate_size=48)
    (d / "f" / "base").rename(d / "models" / "fat")  # same config keys checked, other tensor shapes
    (d / "models" / "empty").mkdir()
    for name, base in (("lora_ok", "base"), ("lora_bad", "wide")):
        (d / "models" / name).mkdir()
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": str(d / "models" / base)}
        (d / "models" / name / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "tasks").mkdir()
    (d / "tasks" / "t.yaml").write_text("task: t\ndataset_path: json\nprocess_results: !function utils.x\n")
    (d / "scorer.py").write_text("def score(model, tokenizer, indices=None, args=None):\n    return [1.0]\n")
    return d


def write(root: Path, text: str, name: str = "space.yaml") -> Path:
    p = root / name
    p.write_text(text)
    return p


BAD = {
    "missing folder": (GOOD.replace("[models/expert0]", "[models/nope]"), "models.0", "not a local folder"),
    "missing base": (GOOD.replace("models/base", "./models/nobase"), "base_model", "not a local folder"),
    "no config": (GOOD.replace("[models/expert0]", "[models/empty]"), "models.0", "no config.json"),
    "architecture": (GOOD.replace("[models/expert0]", "[models/expert0, models/wide]"), "models.1", "hidden_size"),
    "shapes": (GOOD.replace("[models/expert0]", "[models/fat]"), "models.0", "shape"),
    "lora base": (GOOD.replace("[models/expert0]", "[models/lora_bad]"), "models.0", "LoRA adapter"),
    "unknown task": (GOOD.replace("task: t,", "task: nope,"), "objectives.0.task", "no task 'nope'"),
    "report task": (GOOD.replace("tasks/t.yaml", "tasks/gone.yaml"), "report.0.task", "no task"),
    "task path": (GOOD.replace("[tasks]", "[no_tasks]"), "evaluation.task_paths.0", "neither"),
    "scorer file": (GOOD.replace("scorer.py:", "missing.py:"), "objectives.1.scorer", "no scorer file"),
    "scorer module": (GOOD.replace('"scorer.py:score"', "no_such_module_x:f"), "objectives.1.scorer", "no module"),
    "nan weight": (GOOD.replace("layer_groups: 2", "layer_groups: 2, weight_bounds: [.nan, 1]"),
                   "genome.weight_bounds", "finite"),
    "inf density": (GOOD.replace("layer_groups: 2", "layer_groups: 2, density_bounds: [0.1, .inf]"),
                    "genome.density_bounds", "finite"),
    "lo > hi": (GOOD.replace("layer_groups: 2", "layer_groups: 2, weight_bounds: [1.0, 0.0]"),
                "genome.weight_bounds", "below"),
    "nan param": (GOOD.replace("layer_groups: 2", "layer_groups: 2, params: {lambda: .nan}"),
                  "genome.params", "finite"),
    "inf weight": (GOOD.replace('metric: "exact_match,none"}', 'metric: "exact_match,none", weight: .inf}', 1),
                   "objectives.0.weight", "finite"),
    "nan scale": (DFS.replace("scales: per_layer", "scales: per_layer, scale_bounds: [.nan, 1.5]"),
                  "genome.scale_bounds", "finite"),
    "dfs architecture": (DFS.replace("models/expert0", "models/wide"), "models.1", "hidden_size"),
    "dfs missing": (DFS.replace("models/expert0", "models/nope"), "models.1", "not a local folder"),
}


def test_good_spaces_validate(root: Path) -> None:
    sp = load_space(write(root, GOOD))
    assert [o.name for o in sp.objectives] == ["t", "py"]
    assert load_space(write(root, GOOD.replace("[models/expert0]", "[models/expert0, models/lora_ok]")))
    assert load_space(write(root, DFS)).genome.type == "data_flow"
    # a hub id is well-formed, so it is not a missing folder
    assert load_space(write(root, GOOD.replace("[models/expert0]", "[org/model]"))).hub_models == ["org/model"]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_is_refused_naming_the_field(root: Path, case: str) -> None:
    text, field, words = BAD[case]
    with pytest.raises(SpaceError) as e:
        load_space(write(root, text))
    msg = str(e.value)
    assert f"field '{field}': " in msg and words in msg
    assert "\n" not in msg


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_validate_command_refuses_with_one_line(root: Path, tmp_path: Path) -> None:
    # run from elsewhere: relative references resolve against the space file, not the current folder
    for case in ("missing folder", "shapes", "unknown task", "scorer file", "nan weight", "dfs architecture"):
        text, field, words = BAD[case]
        p = _cli("validate", "--space", str(write(root, text, f"{case.replace(' ', '_')}.yaml")), cwd=tmp_path)
        assert p.returncode == 2, (case, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and f"field '{field}': " in lines[0] and words in lines[0], (case, p.stderr)
    ok = _cli("validate", "--space", str(write(root, GOOD, "good.yaml")), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("case", ["missing folder", "unknown task", "nan weight"])
def test_search_on_a_bad_space_creates_no_study(root: Path, tmp_path: Path, case: str) -> None:
    db = tmp_path / "s.db"
    p = _cli("search", "--space", str(write(root, BAD[case][0], "bad.yaml")), "--storage", f"sqlite:///{db}",
             "--no-progress", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    if db.exists():
        with sqlite3.connect(db) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            assert "studies" not in tables or con.execute("select count(*) from studies").fetchone()[0] == 0


def test_hub_only_space_validates_offline_with_a_note(tmp_path: Path) -> None:
    p = _cli("validate", "--space", str(SPACES / "ja_math.yaml"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "weights are fetched at run time" in p.stdout and "mistralai/Mistral-7B-v0.1" in p.stdout
    demo = _cli("validate", "--space", str(SPACES / "demo.yaml"), cwd=tmp_path)
    assert demo.returncode == 0 and "fetched at run time" not in demo.stdout


def test_shapes_come_from_the_headers_of_sharded_checkpoints(root: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from evomerge.genomes.checks import tensor_shapes
    from evomerge.merge.checkpoint import save_state_dict

    sd = load_file(str(root / "models" / "fat" / "model.safetensors"))
    (tmp_path / "sharded").mkdir()
    save_state_dict(sd, tmp_path / "sharded", max_shard_bytes=4096)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert tensor_shapes(tmp_path / "sharded") == {k: tuple(v.shape) for k, v in sd.items()}
    # a sharded source of other shapes is refused like a single-file one
    (tmp_path / "sharded" / "config.json").write_text((root / "models" / "fat" / "config.json").read_text())
    text = GOOD.replace("[models/expert0]", f"[{tmp_path / 'sharded'}]")
    with pytest.raises(SpaceError, match="field 'models.0': .*shape"):
        load_space(write(root, text, "sharded.yaml"))
