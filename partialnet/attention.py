"""The channel/spatial attention modules PATConv is compared with, written here from their papers' definitions.

Each maps [B, C, H, W] to the same shape. `ATTENTION` names them for the conformance suite (benchmarks/modules.py,
tests/partialnet/test_attention.py). Where a paper initialises a residual weight to zero (DANet's gamma), the
module takes it as an argument so that a fresh model exercises the attention.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SE(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): global pool, bottleneck MLP, sigmoid gate per channel."""

    def __init__(self, c: int, reduction: int = 16):
        super().__init__()
        hidden = max(c // reduction, 4)
        self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class CBAM(nn.Module):
    """CBAM (Woo et al. 2018): channel gate from avg- and max-pooled MLP, then a 7x7 spatial gate on [mean, max]."""

    def __init__(self, c: int, reduction: int = 16, kernel: int = 7):
        super().__init__()
        hidden = max(c // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, c, 1, bias=False))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x):
        x = x * torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(s))


class DANet(nn.Module):
    """DANet's position (PAM) and channel (CAM) attention (Fu et al. 2019), summed as in the paper's head."""

    def __init__(self, c: int, gamma: float = 0.5):
        super().__init__()
        self.q, self.k, self.v = nn.Conv2d(c, max(c // 8, 1), 1), nn.Conv2d(c, max(c // 8, 1), 1), nn.Conv2d(c, c, 1)
        self.gamma_p = nn.Parameter(torch.tensor(gamma))
        self.gamma_c = nn.Parameter(torch.tensor(gamma))

    def pam(self, x):
        b, c, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)  # [B, N, C']
        attn = torch.softmax(q @ self.k(x).flatten(2), dim=-1)  # [B, N, N]
        out = (self.v(x).flatten(2) @ attn.transpose(1, 2)).reshape(b, c, h, w)
        return self.gamma_p * out + x

    def cam(self, x):
        b, c, h, w = x.shape
        flat = x.flatten(2)
        energy = flat @ flat.transpose(1, 2)  # [B, C, C]
        attn = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
        return self.gamma_c * (attn @ flat).reshape(b, c, h, w) + x

    def forward(self, x):
        return self.pam(x) + self.cam(x)


class SK(nn.Module):
    """Selective Kernel (Li et al. 2019): 3x3 and dilated 3x3 branches, softmax over branches per channel."""

    def __init__(self, c: int, groups: int = 8, reduction: int = 16, min_dim: int = 32):
        super().__init__()
        g = math.gcd(groups, c)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=d, dilation=d, groups=g, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            for d in (1, 2))
        z = max(c // reduction, min_dim)
        self.fc = nn.Sequential(nn.Conv2d(c, z, 1, bias=False), nn.BatchNorm2d(z), nn.ReLU())
        self.select = nn.Conv2d(z, 2 * c, 1)

    def forward(self, x):
        u = torch.stack([b(x) for b in self.branches], dim=1)  # [B, 2, C, H, W]
        z = self.fc(F.adaptive_avg_pool2d(u.sum(1), 1))
        a = torch.softmax(self.select(z).reshape(x.shape[0], 2, x.shape[1], 1, 1), dim=1)
        return (u * a).sum(1)


class ECA(nn.Module):
    """ECA (Wang et al. 2020): a 1-D conv across the pooled channels, kernel size adapted to C."""

    def __init__(self, c: int, gamma: int = 2, b: int = 1):
        super().__init__()
        k = int(abs(math.log2(c) / gamma + b / gamma))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(x, 1).flatten(2).transpose(1, 2)  # [B, 1, C]
        return x * torch.sigmoid(self.conv(y)).transpose(1, 2).unsqueeze(-1)


class CoordAttention(nn.Module):
    """Coordinate attention (Hou et al. 2021): pools along H and W, shared 1x1 conv + BN + h-swish, two gates."""

    def __init__(self, c: int, reduction: int = 32):
        super().__init__()
        mip = max(8, c // reduction)
        self.conv1, self.bn1 = nn.Conv2d(c, mip, 1), nn.BatchNorm2d(mip)
        self.conv_h, self.conv_w = nn.Conv2d(mip, c, 1), nn.Conv2d(mip, c, 1)

    def forward(self, x):
        h, w = x.shape[2], x.shape[3]
        x_h = x.mean(3, keepdim=True)  # [B, C, H, 1]
        x_w = x.mean(2, keepdim=True).transpose(2, 3)  # [B, C, W, 1]
        y = F.hardswish(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        return x * torch.sigmoid(self.conv_h(y_h)) * torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))


class ShuffleAttention(nn.Module):
    """Shuffle attention (Zhang & Yang 2021): per group, a channel gate on one half and a GroupNorm spatial gate
    on the other, then a channel shuffle."""

    def __init__(self, c: int, groups: int = 8):
        super().__init__()
        self.groups = groups
        half = c // (2 * groups)
        self.cweight, self.cbias = nn.Parameter(torch.zeros(1, half, 1, 1)), nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight, self.sbias = nn.Parameter(torch.zeros(1, half, 1, 1)), nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)
        x0, x1 = x.chunk(2, dim=1)
        xc = x0 * torch.sigmoid(self.cweight * F.adaptive_avg_pool2d(x0, 1) + self.cbias)
        xs = x1 * torch.sigmoid(self.sweight * self.gn(x1) + self.sbias)
        out = torch.cat([xc, xs], dim=1).reshape(b, 2, c // 2, h, w).transpose(1, 2)
        return out.reshape(b, c, h, w)


class CPCA(nn.Module):
    """Channel prior convolutional attention (Huang et al. 2023): channel prior from avg+max MLP gates, then
    multi-scale strip depthwise convs (1x7/7x1, 1x11/11x1, 1x21/21x1) for the spatial map."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        hidden = max(c // reduction, 4)
        self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)
        self.dconv5 = nn.Conv2d(c, c, 5, padding=2, groups=c)
        self.strips = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, (1, k), padding=(0, k // 2), groups=c),
                          nn.Conv2d(c, c, (k, 1), padding=(k // 2, 0), groups=c)) for k in (7, 11, 21))
        self.mix = nn.Conv2d(c, c, 1)
        self.proj_in, self.proj_out = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def gate(self, pooled):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))

    def forward(self, x):
        x = F.gelu(self.proj_in(x))
        x = x * (self.gate(F.adaptive_avg_pool2d(x, 1)) + self.gate(F.adaptive_max_pool2d(x, 1)))
        base = self.dconv5(x)
        spatial = base + sum(s(base) for s in self.strips)
        return self.proj_out(self.mix(spatial) * x)


class EMA(nn.Module):
    """Efficient multi-scale attention (Ouyang et al. 2023): per group, a coordinate 1x1 branch and a 3x3 branch
    that weight each other through cross-spatial softmax matmuls."""

    def __init__(self, c: int, groups: int = 8):
        super().__init__()
        self.groups = groups
        cg = c // groups
        self.conv1, self.conv3 = nn.Conv2d(cg, cg, 1), nn.Conv2d(cg, cg, 3, padding=1)
        self.gn = nn.GroupNorm(cg, cg)

    def forward(self, x):
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, -1, h, w)
        hw = self.conv1(torch.cat([g.mean(3, keepdim=True), g.mean(2, keepdim=True).transpose(2, 3)], dim=2))
        a_h, a_w = torch.split(hw, [h, w], dim=2)
        x1 = self.gn(g * torch.sigmoid(a_h) * torch.sigmoid(a_w.transpose(2, 3)))
        x2 = self.conv3(g)
        s1 = torch.softmax(F.adaptive_avg_pool2d(x1, 1).flatten(1).unsqueeze(1), dim=-1)  # [BG, 1, cg]
        s2 = torch.softmax(F.adaptive_avg_pool2d(x2, 1).flatten(1).unsqueeze(1), dim=-1)
        weights = s1 @ x2.flatten(2) + s2 @ x1.flatten(2)  # [BG, 1, HW]
        return (g * torch.sigmoid(weights.reshape(-1, 1, h, w))).reshape(b, c, h, w)


class SCSA(nn.Module):
    """Spatial and channel synergistic attention (Si et al. 2024): multi-scale depthwise 1-D convs on four channel
    groups give H and W gates (SMSA), then a single-head channel self-attention on a pooled map (PCSA)."""

    def __init__(self, c: int, window: int = 2, kernels: tuple[int, ...] = (3, 5, 7, 9)):
        super().__init__()
        self.split = c // len(kernels)
        self.dw = nn.ModuleList(nn.Conv1d(self.split, self.split, k, padding=k // 2, groups=self.split)
                                for k in kernels)
        self.norm_h, self.norm_w = nn.GroupNorm(4, c), nn.GroupNorm(4, c)
        self.pool = nn.AvgPool2d(window, window)
        self.norm = nn.GroupNorm(1, c)
        self.q = nn.Conv2d(c, c, 1, groups=c, bias=False)
        self.k = nn.Conv2d(c, c, 1, groups=c, bias=False)
        self.v = nn.Conv2d(c, c, 1, groups=c, bias=False)
        self.scale = c ** -0.5

    def _strip(self, t):  # [B, C, L] -> multi-scale depthwise conv per channel group
        n = self.split
        return torch.cat([conv(t[:, i * n:(i + 1) * n]) for i, conv in enumerate(self.dw)], dim=1)

    def forward(self, x):
        a_h = torch.sigmoid(self.norm_h(self._strip(x.mean(3)).unsqueeze(3)))  # [B, C, H, 1]
        a_w = torch.sigmoid(self.norm_w(self._strip(x.mean(2)).unsqueeze(2)))  # [B, C, 1, W]
        x = x * a_h * a_w
        y = self.norm(self.pool(x))
        q, k, v = self.q(y).flatten(2), self.k(y).flatten(2), self.v(y).flatten(2)  # [B, C, N]
        attn = torch.softmax((q @ k.transpose(1, 2)) * self.scale, dim=-1)  # [B, C, C]
        gate = torch.sigmoid((attn @ v).mean(-1))  # [B, C]
        return x * gate.unsqueeze(-1).unsqueeze(-1)


class PSA(nn.Module):
    """EPSANet's pyramid split attention (Zhang et al. 2021): four kernel sizes on four channel splits, an SE weight
    per split, softmax across splits."""

    def __init__(self, c: int, kernels: tuple[int, ...] = (3, 5, 7, 9), groups: tuple[int, ...] = (1, 4, 8, 16)):
        super().__init__()
        s = len(kernels)
        self.split = c // s
        self.convs = nn.ModuleList(nn.Conv2d(c, self.split, k, padding=k // 2, groups=math.gcd(g, self.split))
                                   for k, g in zip(kernels, groups))
        self.se = SE(self.split, reduction=4)

    def forward(self, x):
        feats = torch.stack([conv(x) for conv in self.convs], dim=1)  # [B, S, C/S, H, W]
        b, s, c, h, w = feats.shape
        weights = self.se.fc2(F.relu(self.se.fc1(F.adaptive_avg_pool2d(feats.reshape(b * s, c, h, w), 1))))
        weights = torch.softmax(weights.reshape(b, s, c, 1, 1), dim=1)
        return (feats * weights).reshape(b, s * c, h, w)


ATTENTION: dict[str, Callable[[int], nn.Module]] = {
    "se": SE,
    "cbam": CBAM,
    "danet": DANet,
    "sk": SK,
    "eca": ECA,
    "coord": CoordAttention,
    "shuffle": ShuffleAttention,
    "cpca": CPCA,
    "ema": EMA,
    "scsa": SCSA,
    "psa": PSA,
}


class AttentionCNN(nn.Module):
    """A small CNN with one attention module between two conv stages: the conformance suite's test bed."""

    def __init__(self, module: str, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.attn = ATTENTION[module](width)
        self.tail = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
                                  nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.tail(self.attn(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _cnn_factory(module: str) -> Callable[..., AttentionCNN]:
    def build(num_classes: int = 10) -> AttentionCNN:
        return AttentionCNN(module, num_classes)

    build.__name__ = build.__qualname__ = f"{module}_cnn"
    build.__doc__ = f"The conformance CNN with {ATTENTION[module].__name__}: `deploy export partialnet.attention:{module}_cnn`."
    return build


# One factory per module, exportable as partialnet.attention:NAME_cnn (se_cnn, cbam_cnn, ...).
FACTORIES = {name: _cnn_factory(name) for name in ATTENTION}
globals().update({f.__name__: f for f in FACTORIES.values()})
