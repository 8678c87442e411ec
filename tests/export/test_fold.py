"""The graph-found folds (export/fold.py): each pattern alone with randomized BatchNorms, exact to a stated
tolerance, with what must be gone counted; untraceable models are one-line errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export.fold import ChannelAffine, TraceError, explain_export_error, fold_model
from helpers import randomize_

SIZE = 16
RTOL = 1e-5  # float32 logits, relative to the largest: the folds are computed in float64, then rounded once


def _bns(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def _affines(m: nn.Module) -> int:
    return sum(isinstance(x, ChannelAffine) for x in m.modules())


def check(model: nn.Module, seed: int = 0):
    model = randomize_(model, seed).eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    folded, summary = fold_model(model, SIZE)
    with torch.no_grad():
        ref, got = model(x), folded(x)
    err = ((ref - got).abs().max() / ref.abs().max()).item()
    assert err < RTOL, err
    assert _bns(folded) == 0 and _bns(model) == summary.batchnorms  # the input is left untouched
    return folded, summary


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.dw(F.relu(self.bn(self.conv(x))))).mean((2, 3))


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.drop = nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Dropout(0.5)

    def forward(self, x):
        return self.bn(self.fc(self.drop(x.mean((2, 3)))))


class BNConv(nn.Module):
    """BN -> unpadded grouped conv (folds into its inputs) and BN -> padded conv (must not: stays an affine)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a, self.conv_a = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, groups=2)
        self.bn_b, self.conv_b = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.conv_b(self.bn_b(F.relu(self.conv_a(self.bn_a(x))))).mean((2, 3))


class ScaleBN(nn.Module):
    """A layer scale then BN after a ReLU (composed into one affine), and BN+BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.bn, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.bn(F.relu(self.conv(x)) * self.gamma)).mean((2, 3))


class PartialBlock(nn.Module):
    """PATConv-style: split, partial conv, gate on the other channels + BN, concat, 1x1 conv; then BN over a cat."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.dc, self.du = dim // 4, dim - dim // 4
        self.pconv = nn.Conv2d(self.dc, self.dc, 3, padding=1, bias=False)
        self.gate = nn.Conv2d(self.du, self.du, 1)
        self.bn = nn.BatchNorm2d(self.du)
        self.mix = nn.Conv2d(dim, dim, 1)
        self.pconv2 = nn.Conv2d(self.dc, self.dc, 3, padding=1, bias=False)
        self.cat_bn = nn.BatchNorm2d(dim)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x1, x2 = torch.split(x, [self.dc, self.du], dim=1)
        y = self.mix(torch.cat((self.pconv(x1), self.bn(x2 * torch.sigmoid(self.gate(x2.mean((2, 3), keepdim=True))))), 1))
        y1, y2 = torch.split(F.relu(y), [self.dc, self.du], dim=1)
        return F.relu(self.cat_bn(torch.cat((self.pconv2(y1), y2), 1))).mean((2, 3))


def test_conv_bn_folds_plain_and_depthwise():
    folded, summary = check(ConvBN())
    assert summary.folds == {"conv_bn": 2} and _affines(folded) == 0


def test_linear_bn_folds_and_dropout_goes():
    folded, summary = check(LinearBN())
    assert summary.folds == {"linear_bn": 1} and summary.train_only_removed == 1
    assert not any(isinstance(m, nn.Dropout) for m in folded.modules())


def test_bn_folds_into_an_unpadded_conv_only():
    folded, summary = check(BNConv())
    assert summary.folds == {"bn_conv": 1} and _affines(folded) == 1  # the padded conv keeps its input affine


def test_bn_after_a_channel_scale_and_bn_bn_become_one_affine():
    folded, summary = check(ScaleBN())
    assert summary.folds == {"affine_affine": 2, "channel_scale": 1} and _affines(folded) == 1


def test_partial_block_bn_folds_through_the_concat_into_the_1x1_conv():
    folded, summary = check(PartialBlock(), seed=3)
    # the gated BN into mix's input columns; the BN over the cat split: its conv slice into pconv2
    assert summary.folds == {"bn_cat_conv": 1, "bn_over_cat": 1, "conv_bn": 1}
    assert _affines(folded) == 1  # the untouched half's slice of cat_bn: a Mul and an Add (ReLU follows)


def test_a_wrong_fold_would_fail_this_check():
    model = randomize_(ConvBN(), 0).eval()
    folded, _ = fold_model(model, SIZE)
    folded.get_submodule("conv").bias.data += 1e-3  # what a sign or eps slip in the fold looks like
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        assert ((ref - folded(x)).abs().max() / ref.abs().max()).item() > RTOL


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return y
        return -y


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), Branchy())

    def forward(self, x):
        return self.body(x).mean((2, 3))


def test_data_dependent_control_flow_is_one_line_naming_module_and_line():
    with pytest.raises(TraceError) as e:
        fold_model(Outer().eval(), SIZE)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cannot export body.1 (Branchy): its forward branches or loops on a tensor's value")
    assert "test_fold.py" in msg and "`if y.mean() > 0:`" in msg


class Spectral(nn.Module):
    def forward(self, x):
        return torch.fft.rfft2(x).abs().mean((1, 2, 3)).unsqueeze(1)


def test_a_missing_onnx_op_names_the_module():
    folded, _ = fold_model(nn.Sequential(nn.Conv2d(3, 3, 1), Spectral()).eval(), SIZE)
    msg = explain_export_error(folded, "Exporting the operator 'aten::fft_rfft2' to ONNX opset version 18 is not "
                                       "supported.")
    assert msg == "the ONNX exporter has no aten::fft_rfft2 (used in 1)"
