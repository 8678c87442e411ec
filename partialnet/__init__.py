"""The PartialNet model family: variants, blocks, checkpoint loading and the preprocessing contract.

Names are resolved on first use (PEP 562), so importing `partialnet.errors` or `partialnet.variants` does not
load torch: `deploy --help` starts without it.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LoadedModel": "build", "build_model": "build", "variant_config": "config",
    "CheckpointError": "errors", "DeployError": "errors", "ExitStatus": "errors", "ImageError": "errors",
    "UsageError": "errors",
    "ArchConfig": "config", "PartialNet": "model",
    "VARIANTS": "variants", "Preprocess": "variants", "Variant": "variants", "get_variant": "variants",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'partialnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
