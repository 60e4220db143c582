"""torch for the operator specs' modules, loaded at the first tensor operation rather than with the specs.

The specs (genes, bounds, mergekit names) are read when a space is validated, by commands that never
touch a tensor (`evomerge validate`, a search's start), and importing torch would cost them about 2 s.
An attribute is cached on the proxy when first read, so later reads are plain attribute lookups.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _Torch(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        value = getattr(importlib.import_module("torch"), name)
        setattr(self, name, value)
        return value


torch: Any = _Torch("torch")
