"""Parameters and multiply-accumulates of a PartialNet computed from its ArchConfig alone (no torch), so that
`deploy list` starts in a blink. They follow the module tree of partialnet/model.py and the counting rules of
partialnet/profile.py (fvcore's, spec §1.4); tests/test_model.py holds both counts equal for every variant."""
from __future__ import annotations

from .config import ArchConfig
from .irpe import NUM_BUCKETS

PATCH, MERGE = 4, 2  # stem and patch-merging strides


def _blocks(cfg: ArchConfig):
    """(stage, dim, partial width, channel type) of every block, in order."""
    for i, depth in enumerate(cfg.depths):
        kind = "none" if cfg.mixing == "pconv" else ("self" if i == 3 else "se")
        for j in range(depth):
            yield i, cfg.stage_dim(i), cfg.partial_dim(i, j), kind


def param_count(cfg: ArchConfig, in_chans: int = 3) -> int:
    e = cfg.embed_dim
    total = in_chans * e * PATCH * PATCH + 2 * e  # stem conv + BN affine
    for i, c, dc, kind in _blocks(cfg):
        du, hidden = c - dc, c * cfg.mlp_ratio
        total += dc * dc * 9
        if kind == "se":
            total += du * du * 2 + 2 * du + 2 * du  # SRM (1, 2) conv + its BN, then the mixing BN
        elif kind == "self":
            total += du * 3 * du + du * du + du + cfg.num_heads * NUM_BUCKETS + 2 * du  # qkv, proj, iRPE, LN
        total += c * hidden + 2 * hidden + hidden * c
        if cfg.spatial_attn:
            half = int(0.5 * c)
            total += half * half + (c - half) + 2 * (c - half) + 2 * half
    for i in range(3):
        c = cfg.stage_dim(i)
        total += c * 2 * c * MERGE * MERGE + 2 * 2 * c
    total += cfg.num_features * cfg.feature_dim + cfg.feature_dim * cfg.num_classes + cfg.num_classes
    return total


def mac_count(cfg: ArchConfig, input_size: int = 224, in_chans: int = 3) -> int:
    """MACs of one image at input_size (a multiple of 32)."""
    e = cfg.embed_dim
    side = input_size // PATCH
    total = e * side * side * (in_chans * PATCH * PATCH) + 2 * e * side * side  # stem conv + BN
    stage_side = [side // MERGE**i for i in range(4)]
    for i, c, dc, kind in _blocks(cfg):
        p = stage_side[i] ** 2
        du, hidden = c - dc, c * cfg.mlp_ratio
        total += dc * p * dc * 9
        if kind == "se":
            total += du * du * 2 + 2 * du + 2 * du * p  # SRM conv on [C, 1, 2], its BN, the mixing BN
        elif kind == "self":
            total += 5 * du * p + p * 3 * du * du + p * du * du + 2 * p * p * du  # LN, qkv, proj, q@k and attn@v
        total += hidden * p * c + 2 * hidden * p + c * p * hidden
        if cfg.spatial_attn:
            half = int(0.5 * c)
            rest = c - half
            total += half * p * half + p * rest + 2 * rest * p + 2 * half * p
    for i in range(3):
        c, p_out = cfg.stage_dim(i), (stage_side[i] // MERGE) ** 2
        total += 2 * c * p_out * c * MERGE * MERGE + 2 * 2 * c * p_out
    f = cfg.num_features
    total += f * stage_side[3] ** 2 + cfg.feature_dim * f + cfg.num_classes * cfg.feature_dim
    return total
