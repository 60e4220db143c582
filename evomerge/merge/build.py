"""One-off merges (``evomerge merge``): any recipe through the :class:`~evomerge.merge.Materializer`.

A recipe merges in one lazy materializer (one tensor of each model at a time, merged and dropped).
A layer-stacking recipe (``Recipe.slices``) merges slice by slice, each slice in a lazy materializer
whose models are :class:`~evomerge.merge.checkpoint.Renamed` views: output block ``L0 + j`` reads
block ``start + j`` of each of the slice's models, so the slice is an ordinary recipe over those
views (its block groups moved by ``L0``) and draws its random masks under the output tensor names.
:func:`merge_to_folder` writes the result as a Hugging Face folder, atomically.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge.files import os_error_text, output_dir_problem, staging_dir
from evomerge.merge.checkpoint import (
    LAYER_NAME_RE,
    Reader,
    Renamed,
    TensorSource,
    copy_tokenizer,
    model_path,
    save_state_dict,
)
from evomerge.merge.materialize import Materializer, stacked_config
from evomerge.merge.mergekit_io import MergeJob, config_of, dtype_of
from evomerge.merge.mergekit_settings import ConfigError
from evomerge.merge.operators import get_operator
from evomerge.merge.resident import source_reader
from evomerge.recipe import LayerGroup, LayerSlice, Recipe, tensor_slot

__all__ = ["build_state_dict", "merge_to_folder", "os_error_text", "output_dir_problem"]


def _materializer(base: str, sources: list[str], dtype: torch.dtype, device: str, **kw: Any) -> Materializer:
    # exact magnitude trims (no index: each is used once); mergekit configs vary any parameter per tensor
    return Materializer(
        base, sources, device=device, dtype=dtype, lazy=True, trim_index="none", free_group_params=True, **kw
    )


def build_state_dict(
    recipe: Recipe,
    *,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
    out_dtype: torch.dtype | None = None,
    device: str = "cpu",
    config: dict[str, Any] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The merged checkpoint of any recipe (``{name: tensor}``, on the CPU) and its ``config.json``.

    ``dtype`` is what sources are held in while merging, ``out_dtype`` (default ``dtype``) that of the
    float tensors returned. ``device`` is where the materializer merges. ``config``: the base's config
    (as :func:`~evomerge.merge.checkpoint.read_config` returns it) when the caller has read it already;
    a layer-stacking recipe changes its block count. ``progress`` is told each tensor name.
    """
    base_path = model_path(recipe.base)
    if config is None:
        config = config_of(base_path)
    if recipe.slices is None:
        mat = _materializer(base_path, [model_path(s) for s in recipe.sources], dtype, device)
        merged = mat.iter_merged(recipe, out_dtype)
    else:
        merged = _iter_sliced(recipe, config, dtype, out_dtype, device)
    out = {}
    for name, t in merged:
        if progress is not None:
            progress(name)
        out[name] = t.cpu()
    return out, config


def _iter_sliced(
    recipe: Recipe, config: dict[str, Any], dtype: torch.dtype, out_dtype: torch.dtype | None, device: str
) -> Iterator[tuple[str, Tensor]]:
    """A layer-stacking recipe's tensors, slice by slice; sets ``config``'s block count and layer types."""
    base_path = model_path(recipe.base)
    readers: dict[str, TensorSource] = {}

    def reader(ref: str) -> TensorSource:  # each model read once over all slices (adapters on the base)
        if ref not in readers:
            p = model_path(ref)
            readers[ref] = Reader(p) if ref == recipe.base else source_reader(p, base_path)
        return readers[ref]

    names = reader(recipe.base).keys()
    pre = [n for n in names if tensor_slot(n) == "embed"]
    post = [n for n in names if tensor_slot(n) == "head"]
    sufs = [(m["pre"], m["suf"]) for m in map(LAYER_NAME_RE.match, names) if m and m["idx"] == "0"]
    blocks_from: list[int] = []
    for si, sl in enumerate(recipe.slices):
        first, last = si == 0, si == len(recipe.slices) - 1
        maps = []  # per slice source: output name -> its name in that model
        for src in sl.sources:
            m = {n: n for n in pre} if first else {}
            for j in range(sl.n_layers):
                for p, suf in sufs:
                    m[f"{p}{len(blocks_from) + j}.{suf}"] = f"{p}{src.start + j}.{suf}"
            if last:
                m.update({n: n for n in post})
            maps.append(m)
        base_i, merged_i, sub = _slice_recipe(recipe, sl, len(blocks_from))
        views = [Renamed(reader(s.model), mp) for s, mp in zip(sl.sources, maps, strict=True)]
        # the materializer reads only the config of the model it is named after: the recipe's base
        mat = _materializer(
            base_path, sub.sources, dtype, device, readers=(views[base_i], [views[i] for i in merged_i])
        )
        yield from mat.iter_merged(sub, out_dtype)
        blocks_from.extend(sl.sources[0].start + j for j in range(sl.n_layers))
    stacked_config(config, blocks_from)


def _slice_recipe(recipe: Recipe, sl: LayerSlice, offset: int) -> tuple[int, list[int], Recipe]:
    """One slice as an ordinary recipe whose blocks start at ``offset``: the index of the slice source
    that is its base, those of the merged ones, and the recipe."""
    spec = get_operator(recipe.method)
    # an operator that copies one model's tensor as stored (passthrough) takes the slice's first model,
    # scaled by its weight (mergekit's ``scale``, which the translation keeps as the weight)
    stored = "source_tensor" in spec.context
    if not stored and spec.needs_base:
        sbase = sl.base or recipe.base
        bi = next((i for i, s in enumerate(sl.sources) if s.model == sbase), None)
        if bi is None:
            raise ConfigError(f"slice without its base model {sbase!r} among its sources")
        merged = [i for i in range(len(sl.sources)) if i != bi]
    else:  # no base: the first model is the origin, every model is merged
        bi, merged = 0, list(range(len(sl.sources)))

    def moved(g: LayerGroup) -> LayerGroup:
        upd: dict[str, Any] = {}
        if g.kind == "blocks":
            upd.update(start=g.start + offset, stop=g.stop + offset)
        if stored:
            upd["params"] = {**(g.params or {}), "source": 0, "scale": g.weights[0]}
        return g.model_copy(update=upd)

    sub = Recipe(
        base=sl.sources[bi].model,
        sources=[sl.sources[i].model for i in merged],
        method=recipe.method,
        params={**recipe.params, **sl.params},
        groups=[moved(g) for g in sl.groups],
        seed=recipe.seed,
    )
    return bi, merged, sub


def merge_to_folder(
    job: MergeJob | Recipe,
    out_dir: str | Path,
    *,
    force: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: str | None = None,
    device: str = "cpu",
) -> Path:
    """Build ``job``'s recipe and write a Hugging Face folder at ``out_dir``, atomically.

    The folder holds the safetensors, ``config.json``, the tokenizer files of the base (or of
    ``tokenizer_source``), ``evomerge_recipe.json`` and, for a mergekit input, the YAML as
    ``mergekit_config.yml``. ``out_dir`` must not exist or be empty unless ``force``.
    """
    if isinstance(job, Recipe):
        job = MergeJob(recipe=job)
    out = Path(out_dir)
    problem = output_dir_problem(out, force=force)
    if problem is not None:
        raise ConfigError(problem)
    base_cfg = config_of(model_path(job.recipe.base))
    odt = dtype_of(out_dtype or job.out_dtype)
    if odt is None:  # the base's config says, else its first float tensor
        odt = base_cfg.get("dtype") or base_cfg.get("torch_dtype")
        odt = dtype_of(str(odt).replace("torch.", "")) if odt is not None else None
    # each tensor is cast as it is merged, so float32 copies of the whole output never pile up
    sd, config = build_state_dict(job.recipe, dtype=compute_dtype, out_dtype=odt, device=device, config=base_cfg)
    if odt is None:
        odt = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    sd = {k: (v.to(odt) if v.is_floating_point() and v.dtype != odt else v) for k, v in sd.items()}
    # transformers 5 writes "dtype"; a config from an older one may still carry "torch_dtype"
    dtype_name = str(odt).replace("torch.", "")
    config["dtype"] = dtype_name
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict) and "torch_dtype" in holder:
            holder["torch_dtype"] = dtype_name
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(out)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the folder: {os_error_text(e)}") from None
    try:
        save_state_dict(sd, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer(model_path(job.tokenizer_source or job.recipe.base).split("+")[0], tmp, overwrite=True)
        (tmp / "evomerge_recipe.json").write_text(json.dumps(json.loads(job.recipe.canonical_json()), indent=2) + "\n")
        if job.source_text is not None:
            (tmp / "mergekit_config.yml").write_text(job.source_text)
        if out.exists():  # a folder (output_dir_problem refused anything else), replaced with --force
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:  # disk full, permissions changed meanwhile: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"{out}: writing the model failed: {os_error_text(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
