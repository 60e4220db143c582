"""Worker memory for 7B-class models and K sources, from the materializer's own accounting.

Sizes a GPU worker before any weights are downloaded: the tensor shapes come from a transformers config
built on the meta device (``evomerge.merge.sizing``), and the bytes follow what the materializer holds
(``tests/test_sizing.py`` checks them against a real materializer). Per model, K and dtype it prints the
device memory (base + K task vectors + the method's device index + the preallocated model + the streamed
merge's scratch on a GPU's 2^26-entry chunks), the host memory of the magnitude index, and lm-eval's KV
cache per 1,000 tokens in flight. Instant; no model is read. Usage: ``python bench/worker_memory.py``.
Ends with ``RESULT <json>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (after the path: the checkout's evomerge, not an installed one)
from transformers import LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from evomerge.merge.sizing import checkpoint_shapes, worker_memory  # noqa: E402

GIB = 1 << 30
MODELS = {
    # Mistral-7B-v0.1, the base of search_spaces/ja_math.yaml
    "mistral-7b": MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # Llama-2-7B: multi-head attention, so its KV cache is 4x Mistral's
    "llama-2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    # Qwen2.5-7B: a large vocabulary, untied
    "qwen2.5-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
METHODS = ["task_arithmetic", "dare_ties", "ties", "della"]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def main() -> None:
    rows = []
    print(f"{'model':<12} {'params':>8} {'dtype':<9} {'K':>2} {'method':<16} {'model GiB':>9} {'resident':>9} "
          f"{'device GiB':>10} {'host MiB':>9} {'KV GiB/1k tok':>13}")
    for name, cfg in MODELS.items():
        shapes = checkpoint_shapes(cfg)
        params = sum(torch.Size(s).numel() for s in shapes.values())
        for dname, dtype in DTYPES.items():
            kv = kv_bytes_per_token(cfg, dtype) * 1000
            for k in (1, 2, 3, 4):
                for method in METHODS:
                    if method != "task_arithmetic" and k == 1 and method != "ties":
                        continue
                    m = worker_memory(shapes, k, dtype, method)
                    row = {"model": name, "params": params, "dtype": dname, "k": k, "method": method,
                           "model_bytes": m.model, "resident_bytes": m.resident, "device_bytes": m.device,
                           "host_bytes": m.host, "scratch_bytes": m.scratch, "kv_bytes_per_1k_tokens": kv}
                    rows.append(row)
                    print(f"{name:<12} {params / 1e9:>7.2f}B {dname:<9} {k:>2} {method:<16} {m.model / GIB:>9.2f} "
                          f"{m.resident / GIB:>9.2f} {m.device / GIB:>10.2f} {m.host / (1 << 20):>9.2f} "
                          f"{kv / GIB:>13.3f}")
    key = next(r for r in rows if r["model"] == "mistral-7b" and r["dtype"] == "bfloat16" and r["k"] == 3
               and r["method"] == "dare_ties")
    print("RESULT " + json.dumps({"mistral_7b_k3_bf16_dare_ties": key, "rows": rows}))


if __name__ == "__main__":
    main()
