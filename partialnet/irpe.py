"""Bucket ids of the image relative-position encoding as PartialNet configures it (spec §4).

Euclidean method, ratio 20: alpha = 20, beta = 40, gamma = 160, 81 buckets, no skip token.
Computed with NumPy in float32 (the official code's arithmetic), so an exporter tracing the model records only
the constant ids, never the computation.
"""
from __future__ import annotations

import math
from functools import lru_cache

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ALPHA, BETA, GAMMA = 20.0, 40.0, 160.0
NUM_BUCKETS = 2 * int(BETA) + 1  # 81


def piecewise_index(dist: np.ndarray) -> np.ndarray:
    """iRPE Eq. 18 on non-negative rounded float32 distances: exact up to alpha, logarithmic up to beta."""
    far = dist > ALPHA
    ratio = np.maximum(dist, np.float32(ALPHA)) / np.float32(ALPHA)
    log_part = np.float32(ALPHA) + np.log(ratio) / np.float32(math.log(GAMMA / ALPHA)) * np.float32(BETA - ALPHA)
    far_idx = np.minimum(np.round(log_part), np.float32(BETA))
    return np.where(far, far_idx, np.round(dist)).astype(np.int64)


@lru_cache(maxsize=32)
def _bucket_ids(height: int, width: int) -> np.ndarray:
    rows = np.repeat(np.arange(height), width)
    cols = np.tile(np.arange(width), height)
    diff = np.stack([rows, cols], axis=1)[:, None, :] - np.stack([rows, cols], axis=1)[None, :, :]
    dist = np.round(np.sqrt((diff**2).sum(-1).astype(np.float32)))
    ids = piecewise_index(dist) + int(BETA)
    ids.setflags(write=False)
    return ids


def bucket_ids(height: int, width: int) -> "torch.Tensor":
    """Bucket id for every (query, key) token pair of a height x width map, row-major tokens; shape [N, N]."""
    import torch

    return torch.from_numpy(_bucket_ids(height, width).copy())
