"""Deploy reparameterization (export/reparam.py): the pure folds alone, then whole models against the originals.

Every equivalence check first randomizes BatchNorm statistics and affines, LayerNorm affines and the iRPE
table, and rescales conv/linear weights so activations are O(1): a fresh BN is nearly the identity and the
default init makes logits tiny, so a wrong fold would otherwise still pass.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from export.reparam import (
    DeployAttention,
    DeployBlock,
    DeploySRMGate,
    ReparamSummary,
    bn_affine,
    fold_conv_bn,
    fold_hardsigmoid,
    fold_input_affine,
    fold_qkv_layernorm,
    merge_spatial_attention,
    reparameterize_in_place,
    reparameterize_model,
    reparameterize_model_with_summary,
)
from partialnet import build_model
from partialnet.irpe import NUM_BUCKETS
from partialnet.model import (
    SRM,
    ArchConfig,
    LayerNorm2d,
    PartialNet,
    RelativePositionBias,
    RPEAttention,
    SpatialAttention,
)

INPUT = 64  # px: stage maps 16, 8, 4, 2; smallest size that keeps every stage's SRM std well defined and cheap
FP32_REL_TOL = 1e-5  # max |Δlogit| <= 1e-5 * max |logit| for fp32 deploy vs training model
FP64_REL_TOL = 1e-10  # the algebra is exact: in float64 only rounding noise (~1e-15) may remain
PURE_TOL = 1e-12  # pure folds checked in float64 against the direct computation, absolute on O(1) values


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Tests draw from the global RNG too; seed it so every run sees the same numbers."""
    torch.manual_seed(0)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every folded quantity a value far from the identity, with activations kept O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(rand(*m.weight.shape) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * rand(*m.bias.shape))
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.5 * rand(c))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.5 * rand(c))
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(1.0 + 0.3 * rand(*m.weight.shape))
                m.bias.copy_(0.3 * rand(*m.bias.shape))
            elif isinstance(m, RelativePositionBias):
                m.lookup_table_bias.copy_(rand(*m.lookup_table_bias.shape))
    return model


def random_bn(c: int, seed: int, dtype: torch.dtype = torch.float64) -> nn.BatchNorm2d:
    return randomize_(nn.BatchNorm2d(c), seed).to(dtype).eval()


def rel_err(ref: Tensor, out: Tensor) -> float:
    return ((ref - out).abs().max() / ref.abs().max()).item()


def images(size: int = INPUT, batch: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(123)).to(dtype)


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_deploy_structure(deployed: nn.Module, original: PartialNet) -> None:
    """No training-only module left; every PAT_sp MLP is exactly two 1x1 convs with C+1 merged outputs."""
    assert count(deployed, nn.BatchNorm2d) == 0
    assert count(deployed, SpatialAttention) == 0
    assert not [m for m in deployed.modules() if isinstance(m, nn.LayerNorm) and m.elementwise_affine]
    assert count(deployed, SRM) == 0 and count(deployed, RelativePositionBias) == 0
    blocks = [m for m in deployed.modules() if isinstance(m, DeployBlock)]
    assert len(blocks) == sum(original.cfg.depths)
    for blk in blocks:
        convs = [m for m in blk.mlp.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 2 and all(c.kernel_size == (1, 1) for c in convs)
        dim = blk.mlp.fc1.in_channels
        assert blk.mlp.gated == original.cfg.spatial_attn
        assert blk.mlp.fc2.out_channels == (dim + 1 if original.cfg.spatial_attn else dim)


def expected_param_delta(cfg: ArchConfig) -> int:
    """Parameters the folds remove, derived by hand from spec §6 (BN running stats are buffers, not counted)."""
    delta = -cfg.embed_dim  # patch-embed BN: γ, β (2E) become the conv's bias (E)
    for i, depth in enumerate(cfg.depths):
        c = cfg.stage_dim(i)
        if i < 3:
            delta -= 2 * c  # merging BN(2C): 4C become a 2C bias
        for j in range(depth):
            du = c - cfg.partial_dim(i, j)
            delta -= 2 * c  # mlp.1 BN(2C) -> mlp.0 bias
            if cfg.mixing == "pat" and i < 3:
                delta -= 3 * du  # SRM bn (2du) -> cfc1 bias (du); PAT_ch norm (2du) -> mlp.0 bias
            elif cfg.mixing == "pat":
                delta += du  # LayerNorm affine (2du) -> qkv bias (3du)
                delta -= cfg.num_heads * NUM_BUCKETS  # iRPE table -> baked bias, a buffer
            if cfg.spatial_attn:
                # drop conv_attn (C/2), conv (C²/4), two BN(C/2) (2C); add a 2C-wide row, C+1 biases, C/2 shift
                delta += -(c * c) // 4 + c + 1
    return delta


def assert_summary_counts(summary: ReparamSummary, original: PartialNet, deployed: nn.Module) -> None:
    """The summary's counts equal what the original model held and the deployed one no longer holds."""
    assert summary.batchnorms_folded == count(original, nn.BatchNorm2d)
    assert summary.srm_gates_folded == count(original, SRM)
    assert summary.spatial_attn_merged == count(original, SpatialAttention)
    assert summary.layernorm_affines_folded == count(original, LayerNorm2d)
    assert summary.attention_biases_baked == count(original, RelativePositionBias)
    assert summary.params_before == numel(original)
    assert summary.params_after == numel(deployed)
    assert summary.params_after - summary.params_before == expected_param_delta(original.cfg)


# --------------------------------------------------------------------------------------------------------
# pure folds, each against the direct computation (float64, so the tolerance can be tight)
# --------------------------------------------------------------------------------------------------------


def test_bn_affine_reproduces_eval_batchnorm() -> None:
    bn = random_bn(6, seed=1)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    s, t = bn_affine(bn)
    assert s.dtype == torch.float64
    assert (bn(x) - (x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))).abs().max() <= PURE_TOL


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_conv_bn_matches_conv_then_bn(with_bias: bool) -> None:
    conv = randomize_(nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=with_bias), seed=2).double()
    bn = random_bn(7, seed=3)
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    w, b = fold_conv_bn(conv.weight, conv.bias, bn)
    ref = bn(conv(x))
    assert (ref - F.conv2d(x, w, b, stride=2, padding=1)).abs().max() <= PURE_TOL


def test_fold_conv_bn_keeps_fp32_and_rejects_a_width_mismatch() -> None:
    conv, bn = nn.Conv2d(4, 6, 1, bias=False), random_bn(6, seed=4, dtype=torch.float32)
    w, b = fold_conv_bn(conv.weight, None, bn)
    assert w.dtype == b.dtype == torch.float32
    with pytest.raises(ValueError, match="BatchNorm has 5 channels but the conv has 6 outputs"):
        fold_conv_bn(conv.weight, None, random_bn(5, seed=4))


def test_fold_hardsigmoid_turns_it_into_a_clamp() -> None:
    w, b = torch.randn(6, 4, dtype=torch.float64) * 3, torch.randn(6, dtype=torch.float64)
    x = torch.randn(50, 4, dtype=torch.float64)
    w2, b2 = fold_hardsigmoid(w, b)
    ref = F.hardsigmoid(x @ w.T + b)
    assert ((ref > 0) & (ref < 1)).any() and ((ref == 0) | (ref == 1)).any()  # both regimes exercised
    assert (ref - (x @ w2.T + b2).clamp(0, 1)).abs().max() <= PURE_TOL


def test_fold_input_affine_matches_affine_then_conv() -> None:
    weight = torch.randn(8, 10, 1, 1, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    scale, shift = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    x = torch.randn(2, 10, 3, 3, dtype=torch.float64)
    affine = torch.cat((x[:, :4], x[:, 4:] * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)), dim=1)
    w, b = fold_input_affine(weight, bias, scale, shift, start=4)
    assert (F.conv2d(affine, weight, bias) - F.conv2d(x, w, b)).abs().max() <= PURE_TOL
    with pytest.raises(ValueError, match="only into a 1x1 conv"):
        fold_input_affine(torch.randn(8, 10, 3, 3), None, scale, shift, start=4)


@pytest.mark.parametrize("with_bias", [False, True])
def test_merge_spatial_attention_matches_pat_sp(with_bias: bool) -> None:
    dim, hidden = 8, 16
    sp = randomize_(SpatialAttention(dim), seed=5).double().eval()
    w2 = torch.randn(dim, hidden, 1, 1, dtype=torch.float64) / 4
    b2 = torch.randn(dim, dtype=torch.float64) if with_bias else None
    h = torch.randn(2, hidden, 5, 6, dtype=torch.float64)
    ref = sp(F.conv2d(h, w2, b2))
    merged = merge_spatial_attention(
        w2, b2, sp.conv_attn.weight, sp.conv.weight, bn_affine(sp.norm), bn_affine(sp.norm2)
    )
    assert merged.weight.shape == (dim + 1, hidden, 1, 1) and merged.bias.shape == (dim + 1,)
    z = F.conv2d(h, merged.weight, merged.bias)
    gate = z[:, dim // 2 : dim // 2 + 1].clamp(0, 1)
    assert ((gate > 0) & (gate < 1)).any()  # the gate is not saturated everywhere, so its scale is tested
    out = torch.cat((z[:, : dim // 2] * gate + merged.shift.view(1, -1, 1, 1), z[:, dim // 2 + 1 :]), dim=1)
    assert (ref - out).abs().max() <= PURE_TOL


def test_fold_qkv_layernorm_matches_affine_layernorm_then_scaled_q() -> None:
    dim, heads = 12, 3
    ln = randomize_(nn.LayerNorm(dim, eps=1e-6), seed=6).double()
    qkv = torch.randn(3 * dim, dim, dtype=torch.float64) / math.sqrt(dim)
    scale = (dim // heads) ** -0.5
    tokens = torch.randn(2, 5, dim, dtype=torch.float64)
    ref = ln(tokens) @ qkv.T
    ref = torch.cat((ref[..., :dim] * scale, ref[..., dim:]), dim=-1)
    w, b = fold_qkv_layernorm(qkv, None, ln.weight, ln.bias, scale)
    out = F.layer_norm(tokens, (dim,), eps=1e-6) @ w.T + b
    assert (ref - out).abs().max() <= PURE_TOL


def test_deploy_srm_gate_matches_srm_with_unbiased_std() -> None:
    srm = randomize_(SRM(6), seed=7).double().eval()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64) * 2 + 1
    gate = DeploySRMGate.from_srm(srm, (5, 7), input_size=80)
    assert gate.cfc1.weight.shape == (6, 12, 1, 1)  # a 1x1 conv over [mean; std] stacked on channels
    # the unbiased std's sqrt(N/(N-1)) is in the std half of the weights; the mean half does not depend on N
    other = DeploySRMGate.from_srm(srm, (5, 6), input_size=80).cfc1.weight
    ratio = other[:, 6:] / gate.cfc1.weight[:, 6:]
    assert torch.allclose(ratio, torch.full_like(ratio, math.sqrt((30 / 29) / (35 / 34))), rtol=1e-12, atol=0)
    assert torch.equal(other[:, :6], gate.cfc1.weight[:, :6])
    assert (srm(x) - gate(x)).abs().max() <= PURE_TOL
    with pytest.raises(ValueError, match=r"5x7 map .* got a 6x7 map"):
        gate(torch.randn(2, 6, 6, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs at least 2 positions"):
        DeploySRMGate.from_srm(srm, (1, 1), input_size=16)


def test_deploy_attention_matches_and_rejects_another_resolution() -> None:
    dim, heads = 16, 4
    attn = randomize_(RPEAttention(dim, heads), seed=8).double().eval()
    norm = randomize_(LayerNorm2d(dim), seed=9).double()
    x = torch.randn(2, dim, 3, 3, dtype=torch.float64)
    deploy = DeployAttention.from_training(attn, norm, (3, 3), input_size=96)
    assert deploy.rel_pos_bias.shape == (1, heads, 9, 9)
    assert "rel_pos_bias" not in deploy.state_dict()  # baked per resolution: not a checkpoint weight
    assert deploy.qkv.bias is not None and not deploy.norm.elementwise_affine and deploy.norm.eps == 1e-6
    assert (attn(norm(x)) - deploy(x)).abs().max() <= PURE_TOL
    with pytest.raises(ValueError, match=r"3x3 map \(input 96x96 px\) but got a 4x4 map \(input about 128x128 px\)"):
        deploy(torch.randn(2, dim, 4, 4, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------------------

VARIANT_CASES = [
    (name, sp)
    for name in ("partialnet_t0", "partialnet_t1", "partialnet_t2", "partialnet_s", "partialnet_m", "partialnet_l")
    for sp in (True, False)
]


@pytest.mark.parametrize("name,spatial_attn", VARIANT_CASES)
def test_variant_logits_match_in_fp32(name: str, spatial_attn: bool) -> None:
    model = randomize_(build_model(name, spatial_attn=spatial_attn).model)
    x = images()
    deployed, summary = reparameterize_model_with_summary(model, INPUT)
    with torch.no_grad():
        ref, out = model(x), deployed(x)
    assert ref.abs().max() > 1.0  # non-trivial logits, so a relative bound means something
    assert rel_err(ref, out) <= FP32_REL_TOL
    assert_deploy_structure(deployed, model)
    assert_summary_counts(summary, model, deployed)


def test_float64_reparameterization_is_exact() -> None:
    model = randomize_(build_model("partialnet_t1", spatial_attn=True).model).double()
    x = images(96, dtype=torch.float64)  # 3x3 stage-3 map: more distinct position-bias buckets than 2x2
    deployed = reparameterize_model(model, 96)
    with torch.no_grad():
        assert rel_err(model(x), deployed(x)) <= FP64_REL_TOL


CUSTOM_CASES = {
    # converted DPConv checkpoints: plain partial conv, identity on the rest, per-block widths from the weights
    "pconv+sp": ArchConfig(16, (1, 1, 2, 1), "relu", True, mixing="pconv", partial_dims=((4,), (6,), (16, 10), (40,))),
    "pconv": ArchConfig(16, (1, 1, 2, 1), "gelu", False, mixing="pconv", partial_dims=((8,), (2,), (16, 30), (64,))),
    "pat custom dims": ArchConfig(16, (1, 1, 2, 1), "relu", False, partial_dims=((4,), (6,), (16, 10), (40,))),
}


@pytest.mark.parametrize("case", list(CUSTOM_CASES))
def test_custom_configs_match(case: str) -> None:
    model = randomize_(PartialNet(CUSTOM_CASES[case]))
    x = images()
    deployed, summary = reparameterize_model_with_summary(model, INPUT)
    with torch.no_grad():
        assert rel_err(model(x), deployed(x)) <= FP32_REL_TOL
    assert_deploy_structure(deployed, model)
    assert_summary_counts(summary, model, deployed)
    if model.cfg.mixing == "pconv":
        assert summary.srm_gates_folded == summary.attention_biases_baked == 0


@pytest.fixture(scope="module")
def t1() -> PartialNet:
    return randomize_(build_model("partialnet_t1", spatial_attn=True).model)


def test_summary_counts_t1_with_pat_sp(t1: PartialNet) -> None:
    _, summary = reparameterize_model_with_summary(t1, INPUT)
    # T1: 13 blocks (11 PAT_ch, 2 PAT_sf). BNs: patch embed 1 + merges 3 + mlp.1 13 + PAT_ch 2x11 + PAT_sp 2x13.
    assert summary.to_dict() == {
        "input_size": INPUT,
        "batchnorms_folded": 65,
        "srm_gates_folded": 11,
        "spatial_attn_merged": 13,
        "layernorm_affines_folded": 2,
        "attention_biases_baked": 2,
        "params_before": 6_144_552,  # spec §1.4: T1 with PAT_sp, 6.145 M
        "params_after": 6_144_552 + expected_param_delta(t1.cfg),
    }


def test_reparameterize_rejects_what_it_cannot_fold() -> None:
    model = PartialNet(ArchConfig(16, (1, 1, 1, 1), "relu", False))
    with pytest.raises(ValueError, match=r"input 16 px is too small: stage 3 would have an empty map; .* 32 px"):
        reparameterize_model(model, 16)
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        reparameterize_model(model, 0)
    with pytest.raises(TypeError, match="expected a partialnet.model.PartialNet, got Sequential"):
        reparameterize_model(nn.Sequential(), INPUT)  # type: ignore[arg-type]


def test_original_model_is_left_untouched(t1: PartialNet) -> None:
    before = {k: v.clone() for k, v in t1.state_dict().items()}
    t1.train()
    try:
        deployed = reparameterize_model(t1, INPUT)
        assert t1.training and not deployed.training
    finally:
        t1.eval()
    after = t1.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert count(t1, nn.BatchNorm2d) == 65 and count(t1, SpatialAttention) == 13


def test_reparameterizing_twice_changes_nothing(t1: PartialNet) -> None:
    once = reparameterize_model(t1, INPUT)
    twice, summary = reparameterize_model_with_summary(once, INPUT)
    sd1, sd2 = once.state_dict(), twice.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    buf1, buf2 = dict(once.named_buffers()), dict(twice.named_buffers())
    assert buf1.keys() == buf2.keys() and all(torch.equal(buf1[k], buf2[k]) for k in buf1)
    x = images()
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))
    assert summary.batchnorms_folded == summary.spatial_attn_merged == summary.attention_biases_baked == 0
    assert summary.params_before == summary.params_after
    blocks = [m for m in once.modules() if isinstance(m, DeployBlock)]
    reparameterize_in_place(once, INPUT)
    assert [m for m in once.modules() if isinstance(m, DeployBlock)] == blocks  # same objects, kept as they were


def test_deploy_model_rejects_another_resolution(t1: PartialNet) -> None:
    deployed = reparameterize_model(t1, INPUT)
    with pytest.raises(ValueError, match=r"input 64x64 px\) but got a \d+x\d+ map \(input about 96x96 px\)"):
        deployed(images(96))
    stage3 = [m for m in deployed.modules() if isinstance(m, DeployAttention)]
    assert stage3 and all(m.map_size == (2, 2) for m in stage3)
    with pytest.raises(ValueError, match=r"2x2 map \(input 64x64 px\) but got a 3x3 map"):
        stage3[0](torch.randn(1, stage3[0].dim, 3, 3))
    with pytest.raises(ValueError, match="already reparameterized for input 64 px"):
        reparameterize_model(deployed, 96)


def test_deploy_graph_has_no_std_and_no_in_place_ops() -> None:
    model = randomize_(PartialNet(ArchConfig(16, (1, 1, 2, 1), "relu", True)))
    x = images(batch=1)

    def ops(m: nn.Module) -> set[str]:
        graph = make_fx(m)(x).graph
        return {str(n.target).split(".")[1] for n in graph.nodes if n.op == "call_function" and "aten" in str(n.target)}

    # The training graph has both (torch.std in SRM, in-place ReLU), so the check below can fail.
    assert "std" in ops(model) and "relu_" in ops(model)
    deploy_ops = ops(reparameterize_model(model, INPUT))
    assert not {op for op in deploy_ops if op.endswith("_") or op in ("std", "var", "std_mean", "var_mean")}
    assert "hardsigmoid" not in deploy_ops and "clamp" in deploy_ops
