"""The plug-in zoo as a literal table (no torch), so `deploy list` shows it in a blink.

Params and MACs (224 px, 1000 classes) are recorded from partialnet.profile's hooks on the built models;
tests/partialnet/test_zoo.py holds the table equal to a fresh count.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooModel:
    name: str
    factory: str  # package.module:FACTORY
    about: str
    params: int
    macs_224: int


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("resnet50_pat", "partialnet.zoo:resnet50_pat",
                 "ResNet-50 with PATConv (PAT_ch) in place of its stride-1 3x3 convolutions", 18_886_376, 2_705_408_736),
        ZooModel("mobilenetv2_pat", "partialnet.zoo:mobilenetv2_pat",
                 "MobileNetV2 with PATConv (PAT_ch) in place of its stride-1 depthwise convolutions", 10_409_912, 595_809_640),
    )
}
