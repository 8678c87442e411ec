"""Test helpers shared by several test files."""
from __future__ import annotations

import torch
from torch import nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomize BN statistics and affines, LayerNorm affines and the iRPE tables, in place.

    A fresh BatchNorm is nearly the identity and a fresh iRPE table is zero, so without this a wrong fold or a
    wrong bias gather would still pass.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, lo, hi):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(rand(m.running_mean.shape, -0.5, 0.5))
                m.running_var.copy_(rand(m.running_var.shape, 0.5, 2.0))
                m.weight.copy_(rand(m.weight.shape, 0.5, 1.5))
                m.bias.copy_(rand(m.bias.shape, -0.3, 0.3))
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(rand(m.weight.shape, 0.5, 1.5))
                m.bias.copy_(rand(m.bias.shape, -0.3, 0.3))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(rand(m.bias.shape, -0.1, 0.1))
            if hasattr(m, "lookup_table_bias"):
                m.lookup_table_bias.copy_(torch.randn(m.lookup_table_bias.shape, generator=gen))
    return model
