"""The plug-in zoo: `deploy list`'s recorded params and MACs equal a fresh count with the profile hooks."""
from __future__ import annotations

import json

import pytest

from deploy.cli import main
from partialnet.factory import parse_target
from partialnet.model import PartialMixing
from partialnet.profile import count_macs, count_params
from partialnet.zoo import mobilenetv2_pat, resnet50_pat
from partialnet.zoo_table import ZOO


@pytest.mark.parametrize("build", [resnet50_pat, mobilenetv2_pat])
def test_the_table_equals_the_hooks(build):
    model = build().eval()
    entry = ZOO[build.__name__]
    assert (entry.params, entry.macs_224) == (count_params(model), count_macs(model, 224))
    assert parse_target(entry.name).module == "partialnet.zoo"


def test_patconv_replaces_the_stride_1_convolutions_only():
    r50, mv2 = resnet50_pat(), mobilenetv2_pat()
    assert sum(isinstance(m, PartialMixing) for m in r50.modules()) == 13  # 16 bottlenecks, 3 with stride 2
    assert sum(isinstance(m, PartialMixing) for m in mv2.modules()) == 13  # 17 blocks, 4 with stride 2


def test_deploy_list_shows_the_zoo(capsys):
    assert main(["list", "--json"]) == 0
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["resnet50_pat"]["params_m"], rows["resnet50_pat"]["macs_m_224"]) == (18.886, 2705.4)
    assert (rows["mobilenetv2_pat"]["params_m"], rows["mobilenetv2_pat"]["macs_m_224"]) == (10.41, 595.8)
