"""The literal table of PartialNet variants and the preprocessing each one was evaluated with."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Literal

from .errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing (spec §7.3): resize shorter side to int(N / crop_ratio), center-crop N."""

    input_size: int = 224
    crop_ratio: float = 0.9
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize_size(self) -> int:
        return int(self.input_size / self.crop_ratio)

    def at(self, input_size: int) -> "Preprocess":
        """The same recipe at another input size."""
        return Preprocess(input_size, self.crop_ratio, self.interpolation, self.mean, self.std)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize_size"] = self.resize_size
        d["layout"] = "NCHW"
        d["color"] = "RGB"
        d["scale"] = "x/255"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(
            input_size=int(d["input_size"]),
            crop_ratio=float(d["crop_ratio"]),
            interpolation=d["interpolation"],
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )


IMAGENET = Preprocess()


@dataclass(frozen=True)
class Variant:
    name: str
    embed_dim: int
    depths: tuple[int, int, int, int]
    act: Literal["gelu", "relu"]
    spatial_attn: bool = True  # PAT_sp in every MLP, as in the paper's architecture figure
    num_heads: int = 4  # every published cfg sets patnet_t0=True, i.e. 4 heads
    num_classes: int = 1000
    preprocess: Preprocess = field(default=IMAGENET)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("partialnet_t0", 32, (1, 2, 8, 2), "gelu"),
        Variant("partialnet_t1", 48, (1, 2, 8, 2), "gelu"),
        Variant("partialnet_t2", 64, (2, 2, 6, 4), "relu"),
        Variant("partialnet_s", 96, (2, 2, 9, 4), "relu"),
        Variant("partialnet_m", 128, (2, 3, 16, 4), "relu"),
        Variant("partialnet_l", 160, (2, 3, 20, 4), "relu"),
    )
}


def get_variant(name: str) -> Variant:
    """Look a variant up by its exact name; an unknown name names the closest match and the full list."""
    if name in VARIANTS:
        return VARIANTS[name]
    close = difflib.get_close_matches(name, list(VARIANTS), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise UsageError(f"unknown variant {name!r}.{hint} Known variants: {', '.join(VARIANTS)}.")


def variant_for_shape(embed_dim: int, depths: tuple[int, ...]) -> Variant | None:
    """The table's variant with this embed width and depths, if any."""
    for v in VARIANTS.values():
        if v.embed_dim == embed_dim and tuple(v.depths) == tuple(depths):
            return v
    return None
