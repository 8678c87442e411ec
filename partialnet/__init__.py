"""The PartialNet model family: variants, blocks, checkpoint loading and the preprocessing contract."""
from .build import LoadedModel, build_model, variant_config
from .errors import CheckpointError, DeployError, ImageError, UsageError
from .model import ArchConfig, PartialNet
from .variants import VARIANTS, Preprocess, Variant, get_variant

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
