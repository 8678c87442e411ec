"""A user's own model file, written the way one would: its own modules, no imports from this project.

A small CNN with a PATConv-style partial block (3x3 conv on a quarter of the channels, a channel gate and a BN on
the rest, concat, 1x1 conv), ECA, CBAM and coordinate attention, BatchNorms everywhere; `build(num_classes=10)`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class PartialBlock(nn.Module):
    def __init__(self, dim, n_div=4):
        super().__init__()
        self.dc = dim // n_div
        self.du = dim - self.dc
        self.pconv = nn.Conv2d(self.dc, self.dc, 3, 1, 1, bias=False)
        self.gate = nn.Conv2d(self.du, self.du, 1)
        self.bn = nn.BatchNorm2d(self.du)
        self.mix = nn.Conv2d(dim, dim, 1, bias=False)
        self.mix_bn = nn.BatchNorm2d(dim)

    def forward(self, x):
        x1, x2 = torch.split(x, [self.dc, self.du], dim=1)
        g = torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x2, 1)))
        y = torch.cat((self.pconv(x1), self.bn(x2 * g)), dim=1)
        return x + self.mix_bn(self.mix(y))


class ECA(nn.Module):
    def __init__(self, channels, gamma=2, b=1):
        super().__init__()
        t = int(abs((math.log(channels, 2) + b) / gamma))
        k = t if t % 2 else t + 1
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(x, 1)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * torch.sigmoid(y)


class CBAM(nn.Module):
    def __init__(self, channels, reduction=8, k=7):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels // reduction, channels, 1, bias=False))
        self.conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        ca = torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))
        x = x * ca
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        return x * torch.sigmoid(self.conv(torch.cat([avg_out, max_out], dim=1)))


class CoordAtt(nn.Module):
    def __init__(self, inp, reduction=8):
        super().__init__()
        mip = max(8, inp // reduction)
        self.conv1 = nn.Conv2d(inp, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(mip, inp, 1)
        self.conv_w = nn.Conv2d(mip, inp, 1)

    def forward(self, x):
        n, c, h, w = x.size()
        x_h = F.adaptive_avg_pool2d(x, (h, 1))
        x_w = F.adaptive_avg_pool2d(x, (1, w)).permute(0, 1, 3, 2)
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        x_h, x_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(x_h))
        a_w = torch.sigmoid(self.conv_w(x_w.permute(0, 1, 3, 2)))
        return x * a_w * a_h


def conv_bn(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MyNet(nn.Module):
    def __init__(self, num_classes=10, width=32):
        super().__init__()
        self.stem = conv_bn(3, width, 2)
        self.block = PartialBlock(width)
        self.eca = ECA(width)
        self.down = conv_bn(width, 2 * width, 2)
        self.cbam = CBAM(2 * width)
        self.coord = CoordAtt(2 * width)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.eca(self.block(self.stem(x)))
        x = self.coord(self.cbam(self.down(x)))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def build(num_classes=10):
    return MyNet(num_classes=num_classes)
