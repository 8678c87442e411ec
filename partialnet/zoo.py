"""Plug-in models: PATConv inside classic networks, written here from the papers' definitions.

PATConv is `PartialMixing` with PAT_ch (partialnet/model.py): a 3x3 conv on the first C/4 channels, the SRM
Gaussian channel gate + BN on the rest. It keeps width and resolution, so it replaces a stride-1 3x3 convolution
(ResNet-50's bottleneck) or a stride-1 depthwise convolution (MobileNetV2's inverted residual); the stride-2
layers keep their own convolution. Listed in partialnet/zoo_table.py.
"""
from __future__ import annotations

from torch import nn

from .model import PartialMixing

N_DIV = 4


def patconv(dim: int, n_div: int = N_DIV) -> PartialMixing:
    """PATConv on `dim` channels: partial 3x3 conv on dim // n_div of them, SRM gate + BN on the rest."""
    return PartialMixing(dim, dim // n_div, "se", num_heads=1)


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class Bottleneck(nn.Module):
    """ResNet-50 v1.5 bottleneck (stride on the 3x3), the 3x3 a PATConv where the stride is 1."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        mid = [patconv(width), nn.BatchNorm2d(width)] if stride == 1 else _conv_bn(width, width, 3, stride)
        self.body = nn.Sequential(*_conv_bn(cin, width), nn.ReLU(inplace=True), *mid, nn.ReLU(inplace=True),
                                  *_conv_bn(width, cout))
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class ResNetPAT(nn.Module):
    def __init__(self, depths=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for i, depth in enumerate(depths):
            width = 64 * 2**i
            for j in range(depth):
                blocks.append(Bottleneck(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise (a PATConv where the stride is 1), linear 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [*_conv_bn(cin, hidden), nn.ReLU6(inplace=True)] if expand != 1 else []
        if stride == 1:
            layers += [patconv(hidden), nn.BatchNorm2d(hidden)]
        else:
            layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.ReLU6(inplace=True), *_conv_bn(hidden, cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


# (expansion t, channels c, repeats n, first stride s): MobileNetV2's Table 2
MOBILENETV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2PAT(nn.Module):
    def __init__(self, num_classes: int = 1000, last: int = 1280):
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, 32, 3, 2), nn.ReLU6(inplace=True)]
        cin = 32
        for t, c, n, s in MOBILENETV2:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [*_conv_bn(cin, last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(self.dropout(x))


def resnet50_pat(num_classes: int = 1000) -> ResNetPAT:
    return ResNetPAT(num_classes=num_classes)


def mobilenetv2_pat(num_classes: int = 1000) -> MobileNetV2PAT:
    return MobileNetV2PAT(num_classes=num_classes)
