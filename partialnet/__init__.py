"""The PartialNet model family: variants, blocks, checkpoint loading and the preprocessing contract.

The names below are imported on first use (PEP 562), so `from partialnet.errors import ...` (the CLI's first
import) loads no torch: Ctrl-C or --help in the first second is handled by the CLI, not by an import.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, DeployError, ImageError, UsageError

_LAZY = {
    "LoadedModel": ".build", "build_model": ".build", "variant_config": ".build",
    "ArchConfig": ".model", "PartialNet": ".model",
    "VARIANTS": ".variants", "Preprocess": ".variants", "Variant": ".variants", "get_variant": ".variants",
}

if TYPE_CHECKING:
    from .build import LoadedModel, build_model, variant_config
    from .model import ArchConfig, PartialNet
    from .variants import VARIANTS, Preprocess, Variant, get_variant


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ArchConfig",
    "CheckpointError",
    "DeployError",
    "ImageError",
    "LoadedModel",
    "PartialNet",
    "Preprocess",
    "UsageError",
    "VARIANTS",
    "Variant",
    "build_model",
    "get_variant",
    "variant_config",
]
