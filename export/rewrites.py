"""Inference-form rewrites of a reparameterized PartialNet: the same function in another graph layout.

Each rewrite changes only how the deploy model computes, never what: its weights are a permutation or a
reshape of the folded ones, and `tests/export/test_rewrites.py` holds each to 1e-5 of the largest logit against
the training model with randomized BatchNorm statistics. They are measured one at a time against the plain
reparameterized graph by `benchmarks/rewrites.py` (numbers in benchmarks/REWRITES.md); `ADOPTED` lists those that
were faster on both CPU runtimes (or faster on one and neutral on the other) and that `deploy export` applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reparam import DeployBlock, DeployMLP, DeploySRMGate, _conv_with


@dataclass(frozen=True)
class Rewrite:
    name: str
    summary: str
    apply: Callable[[nn.Module], int]  # rewrites a deploy model in place; returns how many modules it changed


class LinearSRMGate(DeploySRMGate):
    """The SRM gate's folded cfc1 as a matrix product on the flattened [mean; std] vector, not a 1x1 convolution
    on a 1x1 map: runtimes run that as a plain GEMV (OpenVINO: a FullyConnected; ONNX Runtime: a Gemm outside its
    blocked-layout pass, so no reorders around it)."""

    def forward(self, x: Tensor) -> Tensor:
        gate = F.linear(self.stats(x).flatten(1), self.cfc1.weight.flatten(1), self.cfc1.bias).clamp(0.0, 1.0)
        return x * gate[:, :, None, None]


def _srm_gemm(model: nn.Module) -> int:
    changed = 0
    for module in model.modules():
        if type(module) is DeploySRMGate:
            module.__class__ = LinearSRMGate
            changed += 1
    return changed


def _feature_rows(mlp: DeployMLP) -> list[int]:
    """The merged PAT_sp conv's C feature rows, in order, without its gate-logit row (row C/2)."""
    half, _, rest = mlp.splits
    return list(range(half)) + list(range(half + 1, half + 1 + rest))


class LogitLastMLP(nn.Module):
    """The merged PAT_sp MLP with the gate-logit row moved from the middle (row C/2) to the end (row C), so the
    Split after it cuts at C/2 and C: offsets on the runtimes' channel blocks instead of C/2 + 1. The second conv
    is the merged one, its rows permuted in place."""

    def __init__(self, mlp: DeployMLP):
        super().__init__()
        half, one, rest = mlp.splits
        order = _feature_rows(mlp) + [half]
        with torch.no_grad():
            mlp.fc2.weight.copy_(mlp.fc2.weight[order].clone())
            if mlp.fc2.bias is not None:
                mlp.fc2.bias.copy_(mlp.fc2.bias[order].clone())
        self.fc1, self.act, self.fc2, self.gate_shift = mlp.fc1, mlp.act, mlp.fc2, mlp.gate_shift
        self.splits = [half, rest, one]

    def forward(self, x: Tensor) -> Tensor:
        gated, plain, logit = torch.split(self.fc2(self.act(self.fc1(x))), self.splits, dim=1)
        return torch.cat((gated * logit.clamp(0.0, 1.0) + self.gate_shift, plain), dim=1)


class GateConvMLP(nn.Module):
    """The merged PAT_sp MLP with its gate-logit row as a conv of its own on the hidden activation: the second
    conv keeps exactly C rows (no C+1-wide tensor padded up to the runtimes' channel blocks) and the Split cuts
    at C/2. Same rows, same arithmetic as the merged conv."""

    def __init__(self, mlp: DeployMLP):
        super().__init__()
        half, _, rest = mlp.splits
        w, b = mlp.fc2.weight.detach(), mlp.fc2.bias.detach()
        keep = _feature_rows(mlp)
        self.fc1, self.act = mlp.fc1, mlp.act
        self.fc2 = _conv_with(mlp.fc2, w[keep], b[keep])
        self.gate = _conv_with(mlp.fc2, w[half:half + 1], b[half:half + 1])
        self.half, self.rest = half, rest
        self.gate_shift = mlp.gate_shift

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))
        gated, plain = torch.split(self.fc2(h), [self.half, self.rest], dim=1)
        return torch.cat((gated * self.gate(h).clamp(0.0, 1.0) + self.gate_shift, plain), dim=1)


class BroadcastGateMLP(GateConvMLP):
    """`GateConvMLP` with no Split or Concat: `z * clamp(expand(gate(h)), 0, 1) + shift` on all C rows, where
    `expand` (a 1 -> C conv) copies the logit to the gated half and gives the plain half a constant 1, and shift
    is [t; 0]. Multiplying by 1.0 and adding 0.0 leave the plain rows bit-identical."""

    def __init__(self, mlp: DeployMLP):
        super().__init__(mlp)
        dim = self.half + self.rest
        gated = (torch.arange(dim) < self.half).to(self.fc2.weight.dtype)
        self.expand = _conv_with(self.fc2, gated.view(dim, 1, 1, 1), 1.0 - gated)
        shift = torch.zeros(1, dim, 1, 1, dtype=self.fc2.weight.dtype)
        shift[:, :self.half] = self.gate_shift.detach()
        self.full_shift = nn.Parameter(shift)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(h) * self.expand(self.gate(h)).clamp(0.0, 1.0) + self.full_shift


class SummedInputBlock(nn.Module):
    """A PAT_ch block with no Concat between the partial mixing and the MLP's first conv: that 1x1 conv's columns
    split at the conv quarter, `fc1(cat(a, b)) = fc1[:, :dc](a) + fc1[:, dc:](b)`, so the two halves are two
    convs whose outputs are added (the runtimes fuse the Add into the second conv as a sum post-op). The MLP's
    own fc1 becomes an identity; everything after it (activation, second conv, PAT_sp tail) is unchanged."""

    def __init__(self, block: DeployBlock):
        super().__init__()
        mix, mlp = block.spatial_mixing, block.mlp
        dc = mix.dim_conv
        w, b = mlp.fc1.weight.detach(), mlp.fc1.bias
        self.dim_conv, self.dim_untouched = dc, mix.dim_untouched
        self.partial_conv3, self.gate = mix.partial_conv3, mix.attn
        self.fc1_conv = _conv_with(mlp.fc1, w[:, :dc], None)
        self.fc1_gated = _conv_with(mlp.fc1, w[:, dc:], None if b is None else b.detach())
        mlp.fc1 = nn.Identity()
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        return x + self.mlp(self.fc1_conv(self.partial_conv3(x1)) + self.fc1_gated(self.gate(x2)))


def _mix_sum(model: nn.Module) -> int:
    changed = 0
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            continue
        for j, block in enumerate(blocks):
            if (type(block) is DeployBlock and not block.split_shortcut
                    and isinstance(block.spatial_mixing.attn, DeploySRMGate)
                    and isinstance(getattr(block.mlp, "fc1", None), nn.Conv2d)):
                blocks[j] = SummedInputBlock(block)
                changed += 1
    return changed


def _replace_gated_mlps(make: Callable[[DeployMLP], nn.Module]) -> Callable[[nn.Module], int]:
    def apply(model: nn.Module) -> int:
        changed = 0
        for module in model.modules():
            mlp = getattr(module, "mlp", None)
            if type(mlp) is DeployMLP and mlp.gated:  # each rewrite replaces the plain merged form once
                module.mlp = make(mlp)
                changed += 1
        return changed
    return apply


REWRITES: dict[str, Rewrite] = {r.name: r for r in (
    Rewrite("srm_gemm", "SRM gate cfc1 as Gemm on [B, 2C] (not a 1x1 conv on a 1x1 map)", _srm_gemm),
    Rewrite("sp_logit_last", "PAT_sp gate-logit row last: Split at C/2 and C, not C/2 and C/2+1",
            _replace_gated_mlps(LogitLastMLP)),
    Rewrite("sp_gate_conv", "PAT_sp gate row as its own hidden -> 1 conv; the second conv keeps C rows",
            _replace_gated_mlps(GateConvMLP)),
    Rewrite("sp_broadcast", "sp_gate_conv with no Split/Concat: z * clamp(expand(gate)) + [t; 0] on C rows",
            _replace_gated_mlps(BroadcastGateMLP)),
    Rewrite("mix_sum", "PAT_ch block without the mixing Concat: fc1 split by columns, conv(a) + conv(b)", _mix_sum),
)}

ADOPTED: tuple[str, ...] = ()


def apply_rewrites(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Apply the named rewrites to a reparameterized model, in place; returns it."""
    for name in names:
        if name not in REWRITES:
            raise ValueError(f"unknown rewrite {name!r}; known: {', '.join(REWRITES)}")
        REWRITES[name].apply(model)
    return model
