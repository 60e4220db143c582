"""LoRA adapters (PEFT folders) as merge sources: their ``Delta W = B A * scale`` is the task vector.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``). For every adapted module ``m`` it stores ``m.lora_A.weight`` (``r x in``) and
``m.lora_B.weight`` (``out x r``); the module's weight moves by::

    Delta W = (B @ A) * scale,    scale = lora_alpha / r   (or lora_alpha / sqrt(r) with use_rslora)

transposed when ``fan_in_fan_out`` (GPT-2's ``Conv1D`` layout). Embedding adapters store
``lora_embedding_A`` (``r x vocab``) and ``lora_embedding_B`` (``dim x r``): ``Delta W = (B A)^T * scale``.
``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` per module (PEFT's matching: the
pattern matches the end of the module name); the rank is read from the tensors' shapes anyway. Tensors
saved whole (``modules_to_save``, e.g. a new head) replace the base tensor. DoRA adapters
(``use_dora``) are refused: their magnitude vector does not make an additive task vector.

:func:`source_state_dict` is what the materializer needs: for an adapter folder, the base's tensors
plus the adapter's deltas; for anything else, the plain checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from evomerge.merge.checkpoint import load_state_dict

__all__ = ["LoraError", "is_lora_adapter", "load_lora_delta", "source_state_dict"]

_PEFT_PREFIXES = ("base_model.model.", "base_model.")
_LORA_RE = re.compile(
    r"^(?P<mod>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$"
)


class LoraError(ValueError):
    """An adapter that cannot be read or applied (one-line message)."""


def is_lora_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (has ``adapter_config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file()


def _split_ref(path: str | Path) -> tuple[str, str] | None:
    """mergekit's ``model+lora`` reference, when ``path`` is not itself a folder and both parts exist."""
    s = str(path)
    if Path(s).exists() or "+" not in s:
        return None
    model, _, adapter = s.rpartition("+")
    if model and adapter and Path(model).exists() and is_lora_adapter(adapter):
        return model, adapter
    return None


def _adapter_tensors(d: Path) -> dict[str, Tensor]:
    f = d / "adapter_model.safetensors"
    if f.is_file():
        return load_file(str(f))
    f = d / "adapter_model.bin"
    if f.is_file():
        return torch.load(f, map_location="cpu", weights_only=True)
    raise LoraError(f"{d}: adapter folder without adapter_model.safetensors or adapter_model.bin")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first key whose pattern matches the end of the module name."""
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


def _strip_peft(name: str) -> str:
    for p in _PEFT_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def _target_name(module: str, suffix: str, base_sd: dict[str, Tensor]) -> str | None:
    """The base checkpoint's name for ``module + suffix`` (tolerating a missing/extra ``model.``)."""
    cands = [module + suffix, "model." + module + suffix]
    if module.startswith("model."):
        cands.append(module[len("model.") :] + suffix)
    for c in cands:
        if c in base_sd:
            return c
    return None


def load_lora_delta(adapter_dir: str | Path, base_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter's task vector ``{base tensor name: Delta W}`` (float32, shapes of the base tensors).

    Tensors the adapter saved whole (``modules_to_save``) give ``saved - base``. Raises
    :class:`LoraError` for DoRA adapters and for modules the base checkpoint does not have.
    """
    d = Path(adapter_dir)
    if not is_lora_adapter(d):
        raise LoraError(f"{d}: not a PEFT adapter folder (no adapter_config.json)")
    cfg = json.loads((d / "adapter_config.json").read_text())
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise LoraError(f"{d}: peft_type {ptype!r} is not supported (only LoRA adapters)")
    if cfg.get("use_dora"):
        raise LoraError(f"{d}: DoRA adapters (use_dora: true) are not supported")
    tensors = _adapter_tensors(d)
    alpha0 = cfg.get("lora_alpha", 8)
    r0 = cfg.get("r", 8)
    rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))

    pairs: dict[str, dict[str, Tensor]] = {}
    whole: dict[str, Tensor] = {}
    for raw, t in tensors.items():
        name = _strip_peft(raw)
        if ".lora_" in name and name.endswith(".bias"):
            raise LoraError(f"{d}: LoRA biases (lora_bias) are not supported ({raw!r})")
        m = _LORA_RE.match(name)
        if m:
            pairs.setdefault(m.group("mod"), {})[m.group("part")] = t
        elif ".lora_" in name:
            raise LoraError(f"{d}: unsupported adapter tensor {raw!r}")
        else:
            whole[name.replace(".modules_to_save.default", "").replace(".original_module", "")] = t

    out: dict[str, Tensor] = {}
    for mod, parts in pairs.items():
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if emb else "lora_A")
        b = parts.get("lora_embedding_B" if emb else "lora_B")
        if a is None or b is None:
            raise LoraError(f"{d}: module {mod!r} has only one of its LoRA factors")
        r = a.shape[0]
        r_cfg = _pattern_value(cfg.get("rank_pattern"), mod, r0)
        if int(r_cfg) != r:  # the tensors are the truth; a mismatch means a config we misread
            raise LoraError(f"{d}: module {mod!r} has rank {r} but the config says {r_cfg}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), mod, alpha0))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale
        if emb or fan_in_fan_out:
            delta = delta.T
        target = _target_name(mod, ".weight", base_sd)
        if target is None:
            raise LoraError(f"{d}: adapted module {mod!r} has no weight in the base model")
        if tuple(delta.shape) != tuple(base_sd[target].shape):
            raise LoraError(
                f"{d}: Delta W of {mod!r} has shape {tuple(delta.shape)}, the base's {target} "
                f"{tuple(base_sd[target].shape)}"
            )
        out[target] = out.get(target, 0) + delta.contiguous()
    for name, t in whole.items():
        stem, dot, leaf = name.rpartition(".")
        target = _target_name(stem, dot + leaf, base_sd) if dot else (name if name in base_sd else None)
        if target is None:
            raise LoraError(f"{d}: saved tensor {name!r} is not in the base model")
        if t.shape != base_sd[target].shape:
            raise LoraError(
                f"{d}: saved tensor {name!r} has shape {tuple(t.shape)}, the base's {tuple(base_sd[target].shape)}"
            )
        out[target] = t.to(torch.float32) - base_sd[target].to(torch.float32)
    return out


def source_state_dict(path: str | Path, base_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A source's tensors: ``base + Delta W`` for a PEFT adapter folder, the checkpoint otherwise.

    Also accepts mergekit's ``model+adapter`` reference (the adapter applied to ``model``, which need
    not be the base). The adapted tensors keep the dtype of the tensors they modify; the others are
    the base's (or the model's) own tensors, not copies.
    """
    split = _split_ref(path)
    if split is not None:
        model_sd = load_state_dict(split[0])
        return _apply(model_sd, load_lora_delta(split[1], model_sd))
    if is_lora_adapter(path):
        return _apply(base_sd, load_lora_delta(path, base_sd))
    return load_state_dict(path)


def _apply(sd: dict[str, Tensor], deltas: dict[str, Tensor]) -> dict[str, Tensor]:
    out = dict(sd)
    for name, dw in deltas.items():
        b = sd[name]
        out[name] = (b.to(torch.float32) + dw).to(b.dtype)
    return out
