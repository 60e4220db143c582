"""Worker sizing from shapes alone agrees with what the materializer itself holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_models import make_tiny_llama_family

from evomerge.merge import Materializer
from evomerge.merge.checkpoint import Reader
from evomerge.merge.sizing import SCRATCH_BUFFERS, checkpoint_shapes, worker_memory
from evomerge.recipe import LayerGroup, Recipe

K = 3


@pytest.fixture(scope="module")
def family(tmp_path_factory, one_torch_thread) -> dict[bool, tuple[str, list[str]]]:
    root = tmp_path_factory.mktemp("sizing")
    return {tied: make_tiny_llama_family(root / str(tied), n_experts=K, seed=1, tie_word_embeddings=tied)
            for tied in (True, False)}


def _config(base: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base)


@pytest.mark.parametrize("tied", [True, False])
def test_shapes_from_the_config_are_the_checkpoints(family, tied: bool) -> None:
    base, _ = family[tied]
    reader = Reader(base)
    assert checkpoint_shapes(_config(base)) == {n: tuple(reader.get(n).shape) for n in reader.keys()}
    assert ("lm_head.weight" in checkpoint_shapes(_config(base))) is not tied


@pytest.mark.parametrize("method,trim_index", [("dare_ties", "quantile"), ("ties", "quantile"), ("ties", "exact"),
                                               ("breadcrumbs", "quantile"), ("della", "quantile"),
                                               ("task_arithmetic", "quantile")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_resident_bytes_are_the_materializers(family, method: str, trim_index: str, dtype: torch.dtype) -> None:
    base, experts = family[False]
    # quantile_points below the larger tensors' sizes: both the quantile and the full rows are counted
    mat = Materializer(base, experts, dtype=dtype, trim_index=trim_index, quantile_points=1000, chunk=256)
    if method in ("ties", "breadcrumbs"):
        mat.precompute_magnitudes()
    if method == "della":
        mat.precompute_della()
    est = worker_memory(checkpoint_shapes(_config(base)), K, dtype, method, trim_index=trim_index,
                        quantile_points=1000, chunk=256)
    assert est.resident == mat.resident_bytes()
    assert est.model == mat.model_bytes() and est.base == mat.model_bytes() and est.deltas == K * mat.model_bytes()
    assert (est.index_host > 0) == (method in ("ties", "breadcrumbs") and trim_index == "quantile")


@pytest.mark.parametrize("method", sorted(SCRATCH_BUFFERS))
def test_scratch_is_the_executors_workspace(family, method: str) -> None:
    base, experts = family[True]
    mat = Materializer(base, experts, dtype=torch.bfloat16, chunk=256)
    recipe = Recipe(base=base, sources=experts, method=method,
                    groups=[LayerGroup(name="all", kind="all", weights=[0.4] * K, densities=[0.5] * K)])
    mat.apply(recipe, mat.new_model())
    held = sum(t.numel() * t.element_size() for t in mat.executor.ws._bufs.values())
    assert held == worker_memory(checkpoint_shapes(_config(base)), K, torch.bfloat16, method, chunk=256).scratch


def test_seven_billion_with_three_sources_in_bf16() -> None:
    from transformers import MistralConfig

    cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    shapes = checkpoint_shapes(cfg)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    assert params == 7_241_732_096  # Mistral-7B-v0.1's published parameter count
    m = worker_memory(shapes, 3, torch.bfloat16, "dare_ties")
    assert m.model == 2 * params and m.resident == 4 * m.model  # base + 3 task vectors, no index
    assert m.device == 5 * m.model + m.scratch and m.host == 0
    with pytest.raises(ValueError):
        worker_memory(shapes, 0, torch.bfloat16, "ties")


def test_sizing_needs_no_weights(tmp_path: Path) -> None:
    """Shapes come from a config alone: a folder with only config.json is enough."""
    base, _ = make_tiny_llama_family(tmp_path, n_experts=1)
    only_config = tmp_path / "cfg"
    only_config.mkdir()
    (only_config / "config.json").write_text((Path(base) / "config.json").read_text())
    assert checkpoint_shapes(_config(str(only_config))) == checkpoint_shapes(_config(base))
