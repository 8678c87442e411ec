"""Inference-form rewrites (export.rewrites): exact in FP32 against the training model with randomized BN."""
from __future__ import annotations

import copy

import pytest
import torch

from export.reparam import DeployMLP, reparameterize_model
from export.rewrites import REWRITES, BroadcastGateMLP, GateConvMLP, LinearSRMGate, SummedInputBlock, apply_rewrites
from partialnet import build_model
from tests.helpers import randomize_

INPUT = 64
REL_TOL = 1e-5  # of the largest logit, as the issue asks of every rewrite


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=[("partialnet_t0", True), ("partialnet_t2", False)], ids=["t0-sp", "t2"])
def pair(request):
    name, sp = request.param
    model = randomize_(build_model(name, spatial_attn=sp).model, seed=3)
    return model, reparameterize_model(model, INPUT)


@pytest.mark.parametrize("rewrite", [*REWRITES, "srm_gemm+sp_broadcast", "mix_sum+sp_broadcast"])
def test_rewrite_is_exact_in_fp32(pair, rewrite: str) -> None:
    model, deployed = pair
    names = rewrite.split("+")
    rewritten = apply_rewrites(copy.deepcopy(deployed), names)
    x = torch.randn(3, 3, INPUT, INPUT, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, out = model(x), rewritten(x)
    assert ref.abs().max() > 1.0
    assert _rel(ref, out) <= REL_TOL


def test_each_rewrite_changes_what_it_names(pair) -> None:
    model, deployed = pair
    gated = sum(isinstance(m, DeployMLP) and m.gated for m in deployed.modules())
    srm = copy.deepcopy(deployed)
    assert REWRITES["srm_gemm"].apply(srm) == sum(b.spatial_mixing.channel_type == "se"
                                                  for b in model.modules() if hasattr(b, "spatial_mixing"))
    assert any(isinstance(m, LinearSRMGate) for m in srm.modules())
    pat_ch = sum(b.spatial_mixing.channel_type == "se" for b in model.modules() if hasattr(b, "spatial_mixing"))
    summed = copy.deepcopy(deployed)
    assert REWRITES["mix_sum"].apply(summed) == pat_ch
    assert REWRITES["mix_sum"].apply(summed) == 0  # idempotent: a summed block is not split again
    blocks = [m for m in summed.modules() if isinstance(m, SummedInputBlock)]
    assert len(blocks) == pat_ch and all(isinstance(b.mlp.fc1, torch.nn.Identity) for b in blocks)
    assert all(b.fc1_conv.in_channels + b.fc1_gated.in_channels == b.fc1_gated.out_channels // 2 for b in blocks)
    tail = copy.deepcopy(deployed)
    assert REWRITES["sp_logit_last"].apply(tail) == gated
    assert REWRITES["sp_logit_last"].apply(tail) == 0  # idempotent: the rows are moved once
    for name, kind in (("sp_gate_conv", GateConvMLP), ("sp_broadcast", BroadcastGateMLP)):
        rebuilt = copy.deepcopy(deployed)
        assert REWRITES[name].apply(rebuilt) == gated
        assert sum(type(m) is kind for m in rebuilt.modules()) == gated
        assert all(m.fc2.out_channels == m.half + m.rest for m in rebuilt.modules() if isinstance(m, kind))


def test_logit_last_moves_only_the_gate_row() -> None:
    model = randomize_(build_model("partialnet_t0", spatial_attn=True).model, seed=1)
    deployed = reparameterize_model(model, INPUT)
    mlp = next(m for m in deployed.modules() if isinstance(m, DeployMLP) and m.gated)
    before = mlp.fc2.weight.detach().clone()
    half = mlp.splits[0]
    REWRITES["sp_logit_last"].apply(deployed)
    after = mlp.fc2.weight.detach()
    assert torch.equal(after[:half], before[:half])
    assert torch.equal(after[half:-1], before[half + 1:])
    assert torch.equal(after[-1], before[half])


def test_unknown_rewrite_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown rewrite 'nope'; known: srm_gemm"):
        apply_rewrites(torch.nn.Identity(), ["nope"])
