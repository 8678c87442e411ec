"""Bucket ids of the image relative-position encoding as PartialNet configures it (spec §4).

Euclidean method, ratio 20: alpha = 20, beta = 40, gamma = 160, 81 buckets, no skip token.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

ALPHA, BETA, GAMMA = 20.0, 40.0, 160.0
NUM_BUCKETS = 2 * int(BETA) + 1  # 81


def piecewise_index(dist: torch.Tensor) -> torch.Tensor:
    """iRPE Eq. 18 on non-negative rounded distances: exact up to alpha, logarithmic up to beta."""
    far = dist > ALPHA
    log_part = ALPHA + torch.log(dist.clamp(min=ALPHA) / ALPHA) / math.log(GAMMA / ALPHA) * (BETA - ALPHA)
    far_idx = log_part.round().clamp(max=BETA)
    return torch.where(far, far_idx, dist.round()).to(torch.long)


@lru_cache(maxsize=32)
def bucket_ids(height: int, width: int) -> torch.Tensor:
    """Bucket id for every (query, key) token pair of a height x width map, row-major tokens; shape [N, N]."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    pos = torch.stack([rows, cols], dim=1)  # [N, 2]
    diff = pos[:, None, :] - pos[None, :, :]
    dist = diff.square().sum(-1).float().sqrt().round()
    return piecewise_index(dist) + int(BETA)
