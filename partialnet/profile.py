"""Parameter and multiply-accumulate counts, counted the way the official repo's fvcore call does (spec §1.4).

fvcore counts one multiply-add as one FLOP, includes eval-mode BatchNorm (2 per element) and LayerNorm
(5 per element), the attention matmuls and the global pool, and ignores activations, std and softmax.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import RPEAttention


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs_of(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    if isinstance(module, nn.BatchNorm2d):
        return inp.numel() * (2 if module.affine else 1)
    if isinstance(module, nn.LayerNorm):
        return inp.numel() * (5 if module.elementwise_affine else 4)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return inp.numel()
    if isinstance(module, RPEAttention) or (hasattr(module, "qkv") and hasattr(module, "num_heads") and inp.ndim == 4):
        b, c, h, w = inp.shape
        n = h * w
        return 2 * b * n * n * c  # q @ k^T and attn @ v, summed over heads (training or deploy form)
    return 0


def count_macs(model: nn.Module, input_size: int = 224, in_chans: int = 3) -> int:
    """MACs of one forward pass on a single image of input_size x input_size.

    Only shapes matter, so the pass runs on the model's device; build it on the `meta` device to count
    a large variant without computing anything.
    """
    device = next(model.parameters()).device
    total = 0

    def hook(module, args, out):
        nonlocal total
        total += _macs_of(module, args[0], out)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, input_size, input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return total
