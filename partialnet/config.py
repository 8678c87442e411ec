"""The architecture of a PartialNet as plain data (no torch): what the weights' shapes and the forward follow."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from .variants import Variant

Mixing = Literal["pat", "pconv"]


@dataclass(frozen=True)
class ArchConfig:
    """Everything that determines the network's shape and forward.

    `partial_dims[stage][block]` is the width of the 3x3 partial conv (C // 4 unless a checkpoint says
    otherwise). `mixing="pconv"` is a plain partial conv without attention, which is what a DPConv
    checkpoint converts to (spec §5.3).
    """

    embed_dim: int = 32
    depths: tuple[int, int, int, int] = (1, 2, 8, 2)
    act: Literal["gelu", "relu"] = "gelu"
    spatial_attn: bool = True
    num_heads: int = 4
    num_classes: int = 1000
    feature_dim: int = 1280
    mlp_ratio: int = 2
    n_div: int = 4
    partial_dims: tuple[tuple[int, ...], ...] | None = None
    mixing: Mixing = "pat"

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be four positive integers, got {self.depths}")
        if self.act not in ("gelu", "relu"):
            raise ValueError(f"act must be 'gelu' or 'relu', got {self.act!r}")
        if self.partial_dims is not None:
            if [len(s) for s in self.partial_dims] != list(self.depths):
                raise ValueError(f"partial_dims {self.partial_dims} does not match depths {self.depths}")

    def stage_dim(self, i: int) -> int:
        return self.embed_dim * 2**i

    def partial_dim(self, stage: int, block: int) -> int:
        if self.partial_dims is not None:
            return self.partial_dims[stage][block]
        return self.stage_dim(stage) // self.n_div

    @property
    def num_features(self) -> int:
        return self.stage_dim(3)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"] = list(self.depths)
        d["partial_dims"] = [list(s) for s in self.partial_dims] if self.partial_dims is not None else None
        return d


def variant_config(variant: Variant, **overrides) -> ArchConfig:
    """The table's architecture for a variant, with optional field overrides (None means keep)."""
    cfg = ArchConfig(
        embed_dim=variant.embed_dim,
        depths=variant.depths,
        act=variant.act,
        spatial_attn=variant.spatial_attn,
        num_heads=variant.num_heads,
        num_classes=variant.num_classes,
    )
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
