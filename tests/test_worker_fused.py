"""Workers merge with the fused kernels when the space's evaluation.fused_kernels asks for them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from evomerge.genomes import make_genome
from evomerge.run import worker_config
from evomerge.space import load_space
from evomerge.workers import MergeWorker

try:
    from fixtures_models import make_tiny_llama_family
except ImportError:  # tests/ collected as a package
    from tests.fixtures_models import make_tiny_llama_family


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    from evomerge.zoo.modeling import make_tokenizer

    root = tmp_path_factory.mktemp("fused_worker")
    tok = make_tokenizer()
    base, experts = make_tiny_llama_family(root, n_experts=2, seed=3, vocab_size=len(tok), num_hidden_layers=2)
    tok.save_pretrained(base)
    p = root / "space.yaml"
    p.write_text(f"""
base_model: {base}
models: [{experts[0]}, {experts[1]}]
genome: {{method: task_arithmetic, layer_groups: model}}
objectives:
  - {{name: size, kind: cost, measure: params, direction: minimize}}
evaluation: {{fused_kernels: "on"}}
""")
    return p


def _worker(space_file: Path, fused: str) -> MergeWorker:
    cfg = worker_config(load_space(space_file))
    assert cfg.fused == "on"  # from the space
    return MergeWorker(dataclasses.replace(cfg, fused=fused, device="cpu"))


def test_fused_worker_builds_the_eager_model(space_file: Path) -> None:
    from evomerge.merge import kernels

    assert kernels.available(), "torch.compile (with a C compiler) is part of the supported stack"
    eager, fused = _worker(space_file, "off"), _worker(space_file, "on")
    assert eager.info()["merge_kernels"] == "eager" and eager.info()["fused_kernels"] == "off"
    assert fused.info()["merge_kernels"] == "fused" and fused.info()["fused_kernels"] == "on"
    assert eager.materializer.fused is False and fused.materializer.fused is True

    recipe = make_genome(load_space(space_file)).decode([0.8, 0.3])
    assert recipe.method == "task_arithmetic"
    for worker in (eager, fused):
        res = worker.evaluate(0, recipe.canonical_json())
        assert res["error"] is None, res["error"]
    a, b = eager.model.state_dict(), fused.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    assert any(not torch.equal(a[k], eager.materializer.base[k]) for k in a)  # the merge did something


def test_auto_is_the_c_kernels_on_cpu(space_file: Path, monkeypatch) -> None:
    """``auto`` on a CPU worker merges with the C kernels (no compile): the fused worker's bits, not
    torch.compile's start-up; without a C compiler it is eager."""
    from evomerge.merge import native

    auto, fused = _worker(space_file, "auto"), _worker(space_file, "on")
    info = auto.info()
    assert info["fused_kernels"] == "auto" and info["merge_kernels"] == "native"
    assert "cpu" in info["merge_kernels_note"] and "C kernels" in info["merge_kernels_note"]
    assert auto.materializer.native is True and auto.materializer.fused is False
    calls = []
    real = native.merge_segments
    monkeypatch.setattr(native, "merge_segments", lambda *a: calls.append(1) or real(*a))
    recipe = make_genome(load_space(space_file)).decode([0.8, 0.3])
    for worker in (auto, fused):
        res = worker.evaluate(0, recipe.canonical_json())
        assert res["error"] is None, res["error"]
    assert calls == [1, 1]  # both merged in one C call
    a, b = auto.model.state_dict(), fused.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setattr(native, "available", lambda: False)
    info = _worker(space_file, "auto").info()
    assert info["merge_kernels"] == "eager" and "cpu" in info["merge_kernels_note"]


def test_unknown_setting_is_refused(space_file: Path) -> None:
    with pytest.raises(ValueError, match="fused"):
        _worker(space_file, "sometimes")
