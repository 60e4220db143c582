"""What the genome kinds check of a space's models before anything runs, from files only.

A search that starts on a model folder it cannot open burns its whole budget on failing workers, so
``load_space`` refuses such a space first: each local folder exists and holds a ``config.json``, and
each source shares the base's architecture (configs) and tensor names and shapes (the safetensors
headers: the JSON after the first 8 bytes, never the weights). zoo:// models are checked once the zoo
is built (the search builds it before it starts); hub ids are fetched by the workers, so only their
form is checked. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.genomes.base import FieldError
from evomerge.study_refs import StudyRefError, is_study_ref, stored_recipe_json
from evomerge.zoo import ZOO_PREFIX, resolve_zoo_uri, zoo_uri_built

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

# Config fields every parameter-space source must share with the base (the tensors line up by name).
PS_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not one


def finite_bounds(v: tuple[float, float]) -> tuple[float, float]:
    """A gene's (lo, hi): both finite (NaN compares false, so ``lo >= hi`` alone lets it through), lo < hi."""
    if not all(math.isfinite(x) for x in v):
        raise ValueError("bounds must be finite numbers")
    if v[0] >= v[1]:
        raise ValueError("lower bound must be below upper bound")
    return v


def finite_params(v: dict[str, Any]) -> dict[str, Any]:
    """Refuse NaN or infinite numbers among params that reach a recipe (nested lists included)."""

    def bad(x: Any) -> bool:
        if isinstance(x, float):
            return not math.isfinite(x)
        if isinstance(x, (list, tuple)):
            return any(bad(e) for e in x)
        if isinstance(x, dict):
            return any(bad(e) for e in x.values())
        return False

    for k, x in v.items():
        if bad(x):
            raise ValueError(f"param {k!r} must be a finite number")
    return v


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def arch_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config with the block settings (the top level, else ``text_config``)."""
    text = cfg.get("text_config")
    if "num_hidden_layers" not in cfg and isinstance(text, dict) and "num_hidden_layers" in text:
        return {**text, "model_type": cfg.get("model_type", text.get("model_type"))}
    return cfg


def arch_diff(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """The keys whose values differ; a key one config leaves out takes the library's default, so it
    is compared only when both give it."""
    a, b = arch_config(a), arch_config(b)
    return [k for k in keys if k in a and k in b and a[k] != b[k]]


def _header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    with file.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{file}: not a safetensors file")
        head = json.loads(fh.read(n))
    return {k: tuple(v["shape"]) for k, v in head.items() if k != "__metadata__"}


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape of a model folder's safetensors (sharded too), from the headers only;
    None when the folder has no safetensors weights (``.bin`` checkpoints are not checked)."""
    index = read_json(folder / "model.safetensors.index.json")
    if index and isinstance(index.get("weight_map"), dict):
        files = sorted({folder / f for f in index["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("adapter_"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(_header_shapes(f))
    return shapes


class ModelFiles:
    """One model reference of a space, as far as the files say: its folder and config, if local."""

    def __init__(self, field: str, ref: str, folder: Path | None, config: dict[str, Any] | None,
                 adapter: dict[str, Any] | None = None) -> None:
        self.field, self.ref, self.folder, self.config, self.adapter = field, ref, folder, config, adapter

    def shapes(self) -> dict[str, tuple[int, ...]] | None:
        if self.folder is None or self.adapter is not None:
            return None
        try:
            return tensor_shapes(self.folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FieldError(self.field, f"{self.ref!r}: unreadable weights ({str(e).splitlines()[0]})") from None


def open_model(space: SearchSpace, field: str, ref: str,
               other_file: Callable[[str], bool] = lambda r: False) -> ModelFiles:
    """The files of ``ref`` (a space's ``base_model`` or ``models`` entry), or FieldError naming
    ``field`` when a local folder is missing or holds no config. Hub ids, zoo models of a zoo not
    built yet and what ``other_file`` accepts (a kind's own source forms) give no folder."""
    try:
        portable = space.model_ref(ref)
    except StudyRefError as e:
        raise FieldError(field, str(e)) from None
    if is_study_ref(portable):
        if not other_file(portable):
            raise FieldError(field, f"{ref!r}: a stored candidate is a source of data-flow searches only "
                                    "(export it to merge it in parameter space)")
        try:
            stored_recipe_json(portable)
        except StudyRefError as e:
            raise FieldError(field, str(e)) from None
        return ModelFiles(field, ref, None, None)
    if portable.startswith(ZOO_PREFIX):
        if not zoo_uri_built(portable):
            return ModelFiles(field, ref, None, None)
        folder = resolve_zoo_uri(portable)
    elif not Path(portable).is_absolute():  # model_ref keeps a well-formed hub id that is no local path
        # ...but "models/x" beside a local folder "models" is a mistyped folder, not the hub's org "models"
        local = Path(space.source_dir or ".") / ref
        if not local.parent.is_dir():
            return ModelFiles(field, ref, None, None)
        folder = local
    else:
        folder = Path(portable)
    if other_file(str(folder)):
        return ModelFiles(field, ref, None, None)
    if not folder.exists():
        if "+" in folder.name or "+" in str(ref):  # mergekit's model+adapter form: both parts local
            model, _, adapter = str(folder).rpartition("+")
            if Path(model).is_dir() and (Path(adapter) / "adapter_config.json").is_file():
                return ModelFiles(field, ref, None, None)
        raise FieldError(field, f"{ref!r} is not a local folder (no {folder}) nor a hub id 'org/name'")
    if not folder.is_dir():
        raise FieldError(field, f"{ref!r} is not a model folder")
    adapter = read_json(folder / "adapter_config.json")
    if adapter is not None:
        return ModelFiles(field, ref, folder, None, adapter)
    if not (folder / "config.json").is_file():
        raise FieldError(field, f"{ref!r} has no config.json (not a Hugging Face model folder)")
    cfg = read_json(folder / "config.json")
    if cfg is None:
        raise FieldError(field, f"{ref!r}: config.json is not a JSON object")
    return ModelFiles(field, ref, folder, cfg)


def check_adapter_base(m: ModelFiles, base: ModelFiles, keys: Sequence[str]) -> None:
    """A LoRA adapter source: the model it was trained on, when that is a local folder, has the
    base's architecture (its deltas are then added to the space's base)."""
    assert m.adapter is not None
    name = m.adapter.get("base_model_name_or_path")
    if not isinstance(name, str) or base.config is None:
        return
    cfg = read_json(Path(name).expanduser() / "config.json")
    if cfg is None:  # a hub id, or a folder of another machine: the worker checks the tensors
        return
    diff = arch_diff(base.config, cfg, keys)
    if diff:
        raise FieldError(m.field, f"{m.ref!r} is a LoRA adapter of {name!r}, which differs from the base "
                                  f"in {', '.join(diff)}")


def check_same_architecture(base: ModelFiles, sources: Sequence[ModelFiles], keys: Sequence[str],
                            shapes: bool = True) -> None:
    """Every source has the base's config ``keys`` and, with ``shapes``, its tensor names and shapes."""
    base_shapes = base.shapes() if shapes and base.folder is not None else None
    for m in sources:
        if m.adapter is not None:
            check_adapter_base(m, base, keys)
            continue
        if m.config is None or base.config is None:
            continue
        diff = arch_diff(base.config, m.config, keys)
        if diff:
            a, b = arch_config(base.config), arch_config(m.config)
            what = ", ".join(f"{k} {b[k]!r} (base {a[k]!r})" for k in diff)
            raise FieldError(m.field, f"{m.ref!r} differs from {base.ref!r} in {what}")
        if base_shapes is None:
            continue
        theirs = m.shapes()
        if theirs is None:
            continue
        # a head tied to the embeddings is saved once; the merge reads it through the embeddings
        missing = sorted(n for n in set(base_shapes) - set(theirs) if not n.endswith("lm_head.weight"))
        if missing:
            raise FieldError(m.field, f"{m.ref!r} has no tensor {missing[0]!r} of {base.ref!r}")
        for name, shape in base_shapes.items():
            if name in theirs and theirs[name] != shape:
                raise FieldError(m.field, f"{m.ref!r}: tensor {name!r} has shape {list(theirs[name])}, "
                                          f"the base's {list(shape)}")
