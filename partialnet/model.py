"""The PartialNet family (spec §2): module names and shapes equal the official implementation's.

Blocks:
* PAT_ch (stages 0-2): partial 3x3 conv on the first C/4 channels, SRM channel gating + BN on the rest.
* PAT_sf (stage 3): partial 3x3 conv, LayerNorm + multi-head self-attention with an iRPE bias on the rest.
* PAT_sp (every MLP unless switched off): spatial gate on the first half, BN + 1x1 conv on the second half.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ArchConfig
from .irpe import NUM_BUCKETS, bucket_ids

__all__ = ["ArchConfig", "PartialNet"]


def make_act(kind: str) -> nn.Module:
    return nn.GELU() if kind == "gelu" else nn.ReLU(inplace=True)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch, bias=False)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, patch: int = 2):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, patch, stride=patch, bias=False)
        self.norm = nn.BatchNorm2d(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))


class SRM(nn.Module):
    """Style-based channel gate (spec §2.3): dense (1,2) conv over [mean, unbiased std] per channel."""

    def __init__(self, dim: int):
        super().__init__()
        self.cfc1 = nn.Conv2d(dim, dim, kernel_size=(1, 2), bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def style(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.stack([flat.mean(-1), flat.std(-1)], dim=-1).unsqueeze(2)  # [B, C, 1, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.bn(self.cfc1(self.style(x))))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels at every pixel (timm's LayerNorm2d), eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class RelativePositionBias(nn.Module):
    """iRPE 'bias' mode on keys (spec §4.3): a learned [heads, 81] table gathered by bucket id.

    The bias does not depend on the queries, so for a fixed resolution it is a constant [1, heads, N, N].
    """

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.lookup_table_bias = nn.Parameter(torch.zeros(num_heads, NUM_BUCKETS))

    def forward(self, height: int, width: int) -> torch.Tensor:
        ids = bucket_ids(height, width).to(self.lookup_table_bias.device)  # no-op copy on CPU
        n = height * width
        return self.lookup_table_bias[:, ids.flatten()].view(1, self.num_heads, n, n)


class RPEAttention(nn.Module):
    """Multi-head self-attention over the pixels of a [B, C, H, W] map, with the iRPE key bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.rpe_k = RelativePositionBias(num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, C], row-major
        qkv = self.qkv(tokens).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.rpe_k(h, w)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class PartialMixing(nn.Module):
    """PATConv (the official Partial_conv3): 3x3 conv on the first `dc` channels, attention on the rest.

    channel_type 'se' is PAT_ch (SRM gate, then BN); 'self' is PAT_sf (LayerNorm2d, then attention);
    'none' is a plain partial conv with identity on the rest (converted DPConv blocks).
    """

    def __init__(self, dim: int, partial_dim: int, channel_type: Literal["se", "self", "none"], num_heads: int):
        super().__init__()
        if not 0 < partial_dim < dim:
            raise ValueError(f"partial conv width {partial_dim} must lie in (0, {dim})")
        self.dim_conv = partial_dim
        self.dim_untouched = dim - partial_dim
        self.channel_type = channel_type
        self.partial_conv3 = nn.Conv2d(partial_dim, partial_dim, 3, 1, 1, bias=False)
        du = self.dim_untouched
        if channel_type == "se":
            self.attn = SRM(du)
            self.norm = nn.BatchNorm2d(du)
        elif channel_type == "self":
            self.attn = RPEAttention(du, num_heads)
            self.norm = LayerNorm2d(du)

    def branch(self, x2: torch.Tensor) -> torch.Tensor:
        if self.channel_type == "se":
            return self.norm(self.attn(x2))
        if self.channel_type == "self":
            return self.attn(self.norm(x2))
        return x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), self.branch(x2)), dim=1)


class SpatialAttention(nn.Module):
    """PAT_sp (the official partial_spatial_attn_layer_reverse, one head, half split; spec §2.6).

    First half: gated by one hard-sigmoid spatial map, then BN. Second half: BN, then a 1x1 conv.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim_conv = int(0.5 * dim)
        self.dim_untouched = dim - self.dim_conv
        self.conv = nn.Conv2d(self.dim_conv, self.dim_conv, 1, bias=False)
        self.conv_attn = nn.Conv2d(self.dim_untouched, 1, 1, bias=False)
        self.norm = nn.BatchNorm2d(self.dim_untouched)
        self.norm2 = nn.BatchNorm2d(self.dim_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1, y2 = torch.split(x, [self.dim_untouched, self.dim_conv], dim=1)
        y1 = self.norm(y1 * F.hardsigmoid(self.conv_attn(y1)))
        y2 = self.conv(self.norm2(y2))
        return torch.cat((y1, y2), dim=1)


class MLPBlock(nn.Module):
    """One PartialNet block: partial mixing, then a Conv-BN-act-Conv MLP (+ PAT_sp), with residuals.

    In stage 3 ('self') the mixing output is added to the residual too (split shortcut, spec §2.1).
    """

    def __init__(self, dim: int, partial_dim: int, channel_type: str, cfg: ArchConfig):
        super().__init__()
        hidden = int(dim * cfg.mlp_ratio)
        self.split_shortcut = channel_type == "self"
        self.spatial_mixing = PartialMixing(dim, partial_dim, channel_type, cfg.num_heads)
        layers: list[nn.Module] = [
            nn.Conv2d(dim, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            make_act(cfg.act),
            nn.Conv2d(hidden, dim, 1, bias=False),
        ]
        if cfg.spatial_attn:
            layers.append(SpatialAttention(dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_shortcut:
            x = x + self.spatial_mixing(x)
            return x + self.mlp(x)
        return x + self.mlp(self.spatial_mixing(x))


class BasicStage(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class PartialNet(nn.Module):
    """PartialNet classifier. Build one from a variant with `partialnet.build_model`."""

    def __init__(self, cfg: ArchConfig = ArchConfig(), in_chans: int = 3):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(in_chans, cfg.embed_dim)
        stages: list[nn.Module] = []
        for i, depth in enumerate(cfg.depths):
            dim = cfg.stage_dim(i)
            if cfg.mixing == "pconv":
                channel_type = "none"
            else:
                channel_type = "self" if i == 3 else "se"
            blocks = [MLPBlock(dim, cfg.partial_dim(i, j), channel_type, cfg) for j in range(depth)]
            if i == 3 and cfg.mixing == "pconv":
                for blk in blocks:
                    blk.split_shortcut = True
            stages.append(BasicStage(blocks))
            if i < 3:
                stages.append(PatchMerging(dim))
        self.stages = nn.Sequential(*stages)
        self.avgpool_pre_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cfg.num_features, cfg.feature_dim, 1, bias=False),
            make_act(cfg.act),
        )
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)
        self.eval()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool_pre_head(self.forward_features(x))
        return self.head(torch.flatten(x, 1))
