"""Reading and writing Hugging Face checkpoints: tensors one at a time, configs, sharded saves.

:class:`Reader` reads a model folder's tensors one at a time (safetensors headers are read once, a
tensor when asked for), so the materializer never holds a second copy of a model; :class:`Renamed`
shows a reader under other tensor names (an output block read from another block of a model, for
layer-stacking merges). :func:`save_state_dict` writes a state dict as one file or as shards with an
index, the layout ``transformers`` and mergekit write.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from evomerge.zoo import ZOO_PREFIX, resolve_zoo_uri

__all__ = [
    "TOKENIZER_FILES",
    "TensorSource",
    "Reader",
    "Renamed",
    "LAYER_NAME_RE",
    "block_config",
    "checkpoint_names",
    "config_layers",
    "copy_tokenizer",
    "load_state_dict",
    "model_path",
    "read_config",
    "save_state_dict",
    "tied_alias",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# a block's tensor name: the prefix up to ``layers.``, the block index, the rest
LAYER_NAME_RE = re.compile(r"^(?P<pre>.*?(?:^|\.)layers\.)(?P<idx>\d+)\.(?P<suf>.+)$")

# the input embeddings an untied-looking checkpoint's output head is tied to, by architecture family
_TIED_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")


class TensorSource(Protocol):
    """What the materializer reads a model through: :class:`Reader` or a :class:`Renamed` view."""

    path: Path

    def keys(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> Tensor | None: ...

    def get_tied(self, name: str) -> Tensor | None: ...


class Reader:
    """Tensors of a Hugging Face model folder, read one at a time (safetensors) or all at once (.bin)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files: dict[str, Path] = {}
        self._all: dict[str, Tensor] | None = None
        p = self.path
        if p.is_file() and p.suffix == ".safetensors":
            files = [p]
        elif (p / "model.safetensors.index.json").is_file():
            wm = json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]
            self._files = {k: p / v for k, v in wm.items()}
            files = []
        elif (p / "model.safetensors").is_file():
            files = [p / "model.safetensors"]
        else:
            files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._files[k] = f
        if not self._files:
            self._all = load_state_dict(p)

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor], path: str | Path) -> Reader:
        """A reader over tensors already in memory (a LoRA source: base + B·A·scale)."""
        r = cls.__new__(cls)
        r.path, r._files, r._all = Path(path), {}, tensors
        return r

    def keys(self) -> list[str]:
        return list(self._all) if self._all is not None else list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in (self._all if self._all is not None else self._files)

    def get(self, name: str) -> Tensor | None:
        if self._all is not None:
            return self._all.get(name)
        f = self._files.get(name)
        if f is None:
            return None
        with safe_open(str(f), framework="pt") as h:
            return h.get_tensor(name)

    def get_tied(self, name: str) -> Tensor | None:
        """Tensor ``name``; for a tied output head the checkpoint leaves out, the embedding it is tied to."""
        t = self.get(name)
        if t is None and name.endswith("lm_head.weight"):
            for cand in _TIED_EMBEDDINGS:
                if cand in self:
                    return self.get(cand)
        return t


class Renamed:
    """A reader seen under other names: ``names[out] = in`` (output block ``j`` read from block ``i``)."""

    def __init__(self, inner: TensorSource, names: dict[str, str]) -> None:
        self.inner = inner
        self.path = inner.path
        self.names = names

    def keys(self) -> list[str]:
        return list(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> Tensor | None:
        src = self.names.get(name)
        return None if src is None else self.inner.get(src)

    def get_tied(self, name: str) -> Tensor | None:
        src = self.names.get(name)
        return None if src is None else self.inner.get_tied(src)


def model_path(ref: str) -> str:
    """A recipe's model reference as a local path (``zoo://`` models built on demand) or a hub id."""
    return str(resolve_zoo_uri(ref)) if ref.startswith(ZOO_PREFIX) else ref


def tied_alias(name: str, sd: dict[str, Tensor]) -> Tensor | None:
    """For a tied output head missing from a state dict, the input embedding it is tied to."""
    if name.endswith("lm_head.weight"):
        for cand in _TIED_EMBEDDINGS:
            if cand in sd:
                return sd[cand]
    return None


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a Hugging Face model folder (safetensors, sharded or not; ``.bin`` as fallback)."""
    p = Path(path)
    if p.is_file():
        return load_file(str(p)) if p.suffix == ".safetensors" else torch.load(p, map_location="cpu", weights_only=True)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for s in shards:
            out.update(load_file(str(p / s)))
        return out
    single = p / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    files = sorted(p.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bin_index = p / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        out = {}
        for s in sorted(set(json.loads(bin_index.read_text())["weight_map"].values())):
            out.update(torch.load(p / s, map_location="cpu", weights_only=True))
        return out
    if (p / "pytorch_model.bin").is_file():
        return torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{p}: no model weights (model.safetensors, shards, or pytorch_model.bin)")


def checkpoint_names(path: str | Path) -> list[str]:
    """Tensor names of a checkpoint folder (safetensors headers only; falls back to loading)."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    files = [f for f in files if not f.name.startswith("adapter_")]
    if files:
        names: list[str] = []
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                names.extend(fh.keys())
        return names
    return list(load_state_dict(p).keys())


def read_config(path: str | Path) -> dict[str, Any]:
    """A model folder's ``config.json`` as a dict.

    The merge path needs only a few fields (layer count, dtype), and importing transformers' config
    classes for them costs about 2 s, most of a one-off merge's start-up.
    """
    f = Path(path) / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f}: not a JSON object")
    return cfg


def block_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that holds ``num_hidden_layers``: the top level, else ``text_config``
    (composite configs of vision-language models)."""
    text = cfg.get("text_config")
    if "num_hidden_layers" not in cfg and isinstance(text, dict) and "num_hidden_layers" in text:
        return text
    return cfg


def config_layers(cfg: dict[str, Any]) -> int | None:
    """The number of transformer blocks a config (as :func:`read_config` returns it) declares."""
    n = block_config(cfg).get("num_hidden_layers")
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


def copy_tokenizer(src: str | Path, out: str | Path, *, overwrite: bool = False) -> None:
    """Copy the tokenizer (and generation config) files of model folder ``src`` into ``out``."""
    src, out = Path(src), Path(out)
    for fname in TOKENIZER_FILES:
        f = src / fname
        if f.is_file() and (overwrite or not (out / fname).exists()):
            shutil.copy2(f, out / fname)


def save_state_dict(sd: dict[str, Tensor], out: str | Path, max_shard_bytes: int = 5 << 30) -> None:
    """Write ``sd`` into folder ``out``: ``model.safetensors``, or shards of at most ``max_shard_bytes``
    with ``model.safetensors.index.json``."""
    out = Path(out)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nb
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(out / fname), metadata={"format": "pt"})
        for n, t in sh.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
