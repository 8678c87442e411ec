"""Deploy-time reparameterization of PartialNet (spec §6): exact folds that leave fewer and simpler ops.

Two layers:
* Pure fold functions on tensors (`bn_affine`, `fold_conv_bn`, `fold_hardsigmoid`, `fold_input_affine`,
  `merge_spatial_attention`, `fold_qkv_layernorm`). They compute in float64 and return the input dtype, so the
  folded fp32 weights are the correctly rounded result of the exact algebra.
* Deploy-form modules that replace the training modules in place (`DeployBlock`, `DeployPartialMixing`,
  `DeploySRMGate`, `DeployAttention`, `DeployMLP`), driven by `reparameterize_in_place`, which is idempotent.
  `reparameterize_model` does the same on a deep copy and leaves its input untouched.

The deploy model is tied to one input resolution: the iRPE bias of PAT_sf is baked as a constant and SRM's
unbiased-std factor N/(N-1) is a constant (spec §4.4, §8.1, §8.5). Running it at another size is an error.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from partialnet.model import (
    SRM,
    BasicStage,
    LayerNorm2d,
    MLPBlock,
    PartialMixing,
    PartialNet,
    PatchEmbed,
    PatchMerging,
    RelativePositionBias,
    RPEAttention,
    SpatialAttention,
)

# nn.Hardsigmoid is clamp(z / 6 + 1/2, 0, 1) (spec §2); folding these two constants leaves a plain clamp.
HSIG_SLOPE = 1.0 / 6.0
HSIG_OFFSET = 0.5


# --------------------------------------------------------------------------------------------------------
# Pure fold math
# --------------------------------------------------------------------------------------------------------


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def _bn_affine64(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{bn} tracks no running statistics, so its eval output depends on the batch and cannot be folded; "
            f"fold only BatchNorms built with track_running_stats=True."
        )
    mean, var = _f64(bn.running_mean), _f64(bn.running_var)
    gamma = _f64(bn.weight) if bn.weight is not None else torch.ones_like(mean)
    beta = _f64(bn.bias) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as the per-channel affine `y = s*x + t`: s = γ/√(σ²+ε), t = β − μ·s (spec §6)."""
    scale, shift = _bn_affine64(bn)
    dtype = bn.running_var.dtype  # type: ignore[union-attr]
    return scale.to(dtype), shift.to(dtype)


def fold_conv_bn(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold `BN(conv(x) + b)` into one conv: W' = s·W (per output channel), b' = s·b + t (spec §6a)."""
    scale, shift = _bn_affine64(bn)
    if scale.shape[0] != weight.shape[0]:
        raise ValueError(f"BatchNorm has {scale.shape[0]} channels but the conv has {weight.shape[0]} outputs")
    w = _f64(weight) * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else _f64(bias) * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_hardsigmoid(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fold hardsigmoid's 1/6 and 1/2 into the linear map before it, so `hsig(Wx+b) = clamp(W'x+b', 0, 1)`."""
    b = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if bias is None else _f64(bias)
    return (_f64(weight) * HSIG_SLOPE).to(weight.dtype), (b * HSIG_SLOPE + HSIG_OFFSET).to(weight.dtype)


def fold_input_affine(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, start: int = 0
) -> tuple[Tensor, Tensor]:
    """Fold a per-channel affine on input channels [start, start+len(scale)) into the 1x1 conv that reads them.

    `W·cat(x_a, s⊙x_b + t) = W_a·x_a + (W_b·diag(s))·x_b + W_b·t`; this is the PAT_ch BN fold into mlp.0 (§6c).
    Only a 1x1 conv qualifies: a padded k×k conv would see the shift t at the borders differently.
    """
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"an input affine folds only into a 1x1 conv; got a weight of shape {tuple(weight.shape)}")
    stop = start + scale.shape[0]
    if stop > weight.shape[1]:
        raise ValueError(f"channels [{start}, {stop}) do not fit the conv's {weight.shape[1]} inputs")
    w = _f64(weight)
    cols = torch.ones(weight.shape[1], dtype=torch.float64, device=weight.device)
    cols[start:stop] = _f64(scale)
    b = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if bias is None else _f64(bias)
    b = b + w[:, start:stop, 0, 0] @ _f64(shift)
    return (w * cols.view(1, -1, 1, 1)).to(weight.dtype), b.to(weight.dtype)


class SpatialMerge(NamedTuple):
    """PAT_sp merged into the MLP's last conv: weight [C+1, hidden, 1, 1], bias [C+1], post-gate shift [C/2]."""

    weight: Tensor
    bias: Tensor
    shift: Tensor


def merge_spatial_attention(
    weight: Tensor,
    bias: Tensor | None,
    attn_weight: Tensor,
    conv_weight: Tensor,
    affine_gated: tuple[Tensor, Tensor],
    affine_conv: tuple[Tensor, Tensor],
) -> SpatialMerge:
    """Merge PAT_sp (spec §6b) into the 1x1 conv `weight`/`bias` (mlp.3) that feeds it.

    `attn_weight` is conv_attn [1, C/2, 1, 1], `conv_weight` the PAT_sp conv [C/2, C/2, 1, 1], `affine_gated`
    the (s, t) of `norm` (after the gating) and `affine_conv` that of `norm2` (before the conv). Output rows are
    [C/2 gated rows, 1 gate-logit row with hardsigmoid's constants folded, C/2 conv rows]; then
    `a = clamp(z[:, C/2], 0, 1)` and `out = cat(z[:, :C/2] * a + shift, z[:, C/2+1:])`.
    """
    w2 = _f64(weight).flatten(1)  # [C, hidden]
    b2 = torch.zeros(w2.shape[0], dtype=torch.float64, device=weight.device) if bias is None else _f64(bias)
    wa = _f64(attn_weight).flatten(1)  # [1, C/2]
    wc = _f64(conv_weight).flatten(1)  # [C/2, C/2]
    dun, dcv = wa.shape[1], wc.shape[0]
    if dun + dcv != w2.shape[0]:
        raise ValueError(f"PAT_sp halves {dun} + {dcv} do not add up to the conv's {w2.shape[0]} outputs")
    s_a, t_a = (_f64(t) for t in affine_gated)
    s_b, t_b = (_f64(t) for t in affine_conv)
    w2a, w2b, b2a, b2b = w2[:dun], w2[dun:], b2[:dun], b2[dun:]
    # The gate a is one scalar per pixel shared by all gated channels, so norm's scale commutes with it;
    # its shift comes after a data-dependent multiply and has to stay a separate add.
    gated_w, gated_b = s_a[:, None] * w2a, s_a * b2a
    logit_w = (wa @ w2a) * HSIG_SLOPE
    logit_b = (wa @ b2a) * HSIG_SLOPE + HSIG_OFFSET
    conv_w = wc @ (s_b[:, None] * w2b)
    conv_b = wc @ (s_b * b2b + t_b)
    merged_w = torch.cat((gated_w, logit_w, conv_w)).view(dun + 1 + dcv, w2.shape[1], 1, 1)
    merged_b = torch.cat((gated_b, logit_b, conv_b))
    dtype = weight.dtype
    return SpatialMerge(merged_w.to(dtype), merged_b.to(dtype), t_a.to(dtype))


def fold_qkv_layernorm(
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    attn_scale: float,
) -> tuple[Tensor, Tensor]:
    """Fold LayerNorm's affine and the attention scale into the qkv Linear (spec §6d).

    `Wqkv·(γ⊙n + β) = (Wqkv·diag(γ))·n + Wqkv·β`; then the q rows (0..C-1) of weight and bias are multiplied by
    the scale, which removes the in-place `q *= scale` of the official code.
    """
    w = _f64(qkv_weight)
    dim = w.shape[1]
    if w.shape[0] != 3 * dim:
        raise ValueError(f"qkv weight must be [3C, C]; got {tuple(qkv_weight.shape)}")
    gamma = torch.ones(dim, dtype=torch.float64, device=w.device) if ln_weight is None else _f64(ln_weight)
    beta = torch.zeros(dim, dtype=torch.float64, device=w.device) if ln_bias is None else _f64(ln_bias)
    b = w @ beta if qkv_bias is None else w @ beta + _f64(qkv_bias)
    w = w * gamma[None, :]
    rows = torch.ones(3 * dim, dtype=torch.float64, device=w.device)
    rows[:dim] = attn_scale
    return (w * rows[:, None]).to(qkv_weight.dtype), (b * rows).to(qkv_weight.dtype)


# --------------------------------------------------------------------------------------------------------
# Deploy-form modules
# --------------------------------------------------------------------------------------------------------


def _conv_with(template: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    """A Conv2d with the template's geometry and the given (folded) weight and bias."""
    conv = torch.nn.utils.skip_init(
        nn.Conv2d,
        weight.shape[1] * template.groups,
        weight.shape[0],
        template.kernel_size,
        stride=template.stride,
        padding=template.padding,
        dilation=template.dilation,
        groups=template.groups,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    conv.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone())
    return conv


def _linear_with(weight: Tensor, bias: Tensor) -> nn.Linear:
    lin = torch.nn.utils.skip_init(
        nn.Linear, weight.shape[1], weight.shape[0], bias=True, device=weight.device, dtype=weight.dtype
    )
    lin.weight = nn.Parameter(weight.detach().clone())
    lin.bias = nn.Parameter(bias.detach().clone())
    return lin


def fold_conv_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv followed by BN as one conv with bias (patch embedding and patch merging)."""
    return _conv_with(conv, *fold_conv_bn(conv.weight, conv.bias, bn))


def _out_size(size: int, conv: nn.Conv2d) -> int:
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]  # type: ignore[index]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_map_size(what: str, x: Tensor, baked: tuple[int, int], input_size: int) -> None:
    """Raise a ValueError naming both resolutions if `x` is not the map this module was folded for."""
    if torch.jit.is_tracing():
        # The legacy tracer hands out sizes as traced tensors; the guard is a Python check, not part of the graph.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            got = (int(x.shape[2]), int(x.shape[3]))
    else:
        got = (x.shape[2], x.shape[3])
    if got != baked:
        stride = input_size // baked[0]
        raise ValueError(
            f"{what} was reparameterized for a {baked[0]}x{baked[1]} map (input {input_size}x{input_size} px) but "
            f"got a {got[0]}x{got[1]} map (input about {got[0] * stride}x{got[1] * stride} px). The deploy model is "
            f"tied to one resolution: reparameterize the training model again with input_size={got[0] * stride}."
        )


class DeploySRMGate(nn.Module):
    """PAT_ch's SRM gate: `x * clamp(cfc1(cat(mean, std)), 0, 1)` with BN, hardsigmoid and the std's N/(N-1)
    correction folded into cfc1.

    cfc1 is the official (1, 2) conv over [mean, std] laid out side by side, rewritten as a 1x1 conv over the two
    stacked on the channel axis ([B, 2C, 1, 1]: mean channels first): runtimes run a 1x1 conv on a 1x1 map as a
    matrix-vector product, the (1, 2) kernel as a general convolution (OpenVINO: 17 us against a few on T0).
    The unbiased std is `sqrt(N/(N-1)) · sqrt(mean((x-μ)²))` with N fixed by the export resolution; the constant
    factor lives in the std half of the weights, so the graph has no std op, no shape arithmetic and no extra
    multiply (spec §8.5).
    """

    def __init__(self, cfc1: nn.Conv2d, map_size: tuple[int, int], input_size: int):
        super().__init__()
        if cfc1.kernel_size != (1, 1) or cfc1.in_channels != 2 * cfc1.out_channels:
            raise ValueError(f"DeploySRMGate takes the folded 1x1 cfc1 over [mean; std]; got {cfc1}.")
        self.cfc1 = cfc1
        self.map_size = map_size
        self.input_size = input_size

    @classmethod
    def from_srm(cls, srm: SRM, map_size: tuple[int, int], input_size: int) -> "DeploySRMGate":
        n = map_size[0] * map_size[1]
        if n < 2:
            raise ValueError(
                f"SRM's unbiased std needs at least 2 positions, but at input {input_size} px its map is "
                f"{map_size[0]}x{map_size[1]} (the official model gives NaN there). Use a larger input size."
            )
        w, b = fold_hardsigmoid(*fold_conv_bn(srm.cfc1.weight, srm.cfc1.bias, srm.bn))
        # [C, C, 1, 2] -> [C, 2C, 1, 1]: the mean column, then the std column times sqrt(N/(N-1))
        w64 = w.double()
        stacked = torch.cat((w64[:, :, 0, 0], w64[:, :, 0, 1] * math.sqrt(n / (n - 1))), dim=1)[..., None, None].to(w.dtype)
        conv = torch.nn.utils.skip_init(
            nn.Conv2d, stacked.shape[1], stacked.shape[0], 1, bias=True, device=w.device, dtype=w.dtype
        )
        return cls(_conv_with(conv, stacked, b), map_size, input_size)

    def stats(self, x: Tensor) -> Tensor:
        """[mean; std] per channel, [B, 2C, 1, 1]: what cfc1 reads."""
        _check_map_size("this SRM gate", x, self.map_size, self.input_size)
        mean = x.mean(dim=(2, 3), keepdim=True)
        centered = x - mean
        std = (centered * centered).mean(dim=(2, 3), keepdim=True).sqrt()  # biased; the correction is in cfc1
        return torch.cat((mean, std), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.cfc1(self.stats(x)).clamp(0.0, 1.0)


class DeployAttention(nn.Module):
    """PAT_sf: no-affine LayerNorm over channels, then attention with the LN affine and scale folded into qkv
    and the relative-position bias baked as a constant for one resolution (spec §4.4, §6d)."""

    rel_pos_bias: Tensor

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        rel_pos_bias: Tensor,
        num_heads: int,
        map_size: tuple[int, int],
        input_size: int,
        eps: float,
    ):
        super().__init__()
        self.dim = qkv.in_features
        self.num_heads = num_heads
        self.map_size = map_size
        self.input_size = input_size
        self.norm = nn.LayerNorm(self.dim, eps=eps, elementwise_affine=False)
        self.qkv = qkv
        self.proj = proj
        # Non-persistent: the baked bias depends on the resolution and is not a checkpoint weight (spec §4.4).
        self.register_buffer("rel_pos_bias", rel_pos_bias, persistent=False)

    @classmethod
    def from_training(
        cls, attn: RPEAttention, norm: LayerNorm2d, map_size: tuple[int, int], input_size: int
    ) -> "DeployAttention":
        w, b = fold_qkv_layernorm(attn.qkv.weight, attn.qkv.bias, norm.weight, norm.bias, attn.scale)
        bias = attn.rpe_k(*map_size).detach().clone()
        return cls(_linear_with(w, b), attn.proj, bias, attn.num_heads, map_size, input_size, norm.eps)

    def forward(self, x: Tensor) -> Tensor:
        _check_map_size("this attention's relative-position bias", x, self.map_size, self.input_size)
        h, w = self.map_size
        n, c, heads = h * w, self.dim, self.num_heads
        # -1 keeps the batch dimension free while every other size is a constant (no shape arithmetic in graphs).
        tokens = self.norm(x.reshape(-1, c, n).transpose(1, 2))  # [B, N, C], row-major tokens
        qkv = self.qkv(tokens).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) + self.rel_pos_bias).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(out).transpose(1, 2).reshape(-1, c, h, w)


class DeployPartialMixing(nn.Module):
    """`cat(conv3x3(x1), attn(x2))`: the partial conv with a folded branch ('se': gate only, its BN went into
    the MLP; 'self': deploy attention; 'none': identity)."""

    def __init__(self, partial_conv3: nn.Conv2d, dim_untouched: int, attn: nn.Module):
        super().__init__()
        self.dim_conv = partial_conv3.in_channels
        self.dim_untouched = dim_untouched
        self.partial_conv3 = partial_conv3
        self.attn = attn

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), self.attn(x2)), dim=1)


class DeployMLP(nn.Module):
    """Conv1x1 (all BNs before it folded) → act → Conv1x1, with PAT_sp merged into the second conv if present.

    With PAT_sp the second conv has C+1 outputs [C/2 gated, 1 gate logit, C/2 plain] (spec §6b).
    """

    def __init__(self, fc1: nn.Conv2d, act: nn.Module, fc2: nn.Conv2d, gate_shift: Tensor | None = None):
        super().__init__()
        self.fc1 = fc1
        self.act = act
        self.fc2 = fc2
        self.gated = gate_shift is not None
        if gate_shift is not None:
            half = gate_shift.shape[0]
            self.splits = [half, 1, fc2.out_channels - half - 1]
            self.gate_shift = nn.Parameter(gate_shift.detach().clone().view(1, half, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc2(self.act(self.fc1(x)))
        if not self.gated:
            return z
        gated, logit, plain = torch.split(z, self.splits, dim=1)
        return torch.cat((gated * logit.clamp(0.0, 1.0) + self.gate_shift, plain), dim=1)


class DeployBlock(nn.Module):
    """A PartialNet block after reparameterization; same residual structure as `MLPBlock` (spec §2.1)."""

    def __init__(self, spatial_mixing: DeployPartialMixing, mlp: DeployMLP, split_shortcut: bool):
        super().__init__()
        self.split_shortcut = split_shortcut
        self.spatial_mixing = spatial_mixing
        self.mlp = mlp

    @classmethod
    def from_block(cls, block: MLPBlock, map_size: tuple[int, int], input_size: int) -> "DeployBlock":
        """Fold one training block: SRM/BN/LN/scale/RPE in the mixing, BN1 and PAT_sp in the MLP."""
        mix: PartialMixing = block.spatial_mixing
        mlp = block.mlp
        conv1, bn1, act, conv2 = mlp[0], mlp[1], mlp[2], mlp[3]
        w1, b1 = conv1.weight, conv1.bias
        attn: nn.Module
        if mix.channel_type == "se":
            if block.split_shortcut:
                # The mixing output would also feed the residual, so its BN cannot live only inside mlp.0 (§6c).
                raise ValueError("a PAT_ch block with a split shortcut cannot fold its BN into mlp.0 (spec §6c)")
            w1, b1 = fold_input_affine(w1, b1, *bn_affine(mix.norm), start=mix.dim_conv)
            attn = DeploySRMGate.from_srm(mix.attn, map_size, input_size)
        elif mix.channel_type == "self":
            attn = DeployAttention.from_training(mix.attn, mix.norm, map_size, input_size)
        else:
            attn = nn.Identity()
        fc1 = _conv_with(conv1, *fold_conv_bn(w1, b1, bn1))
        if len(mlp) > 4:
            sp: SpatialAttention = mlp[4]
            merged = merge_spatial_attention(
                conv2.weight, conv2.bias, sp.conv_attn.weight, sp.conv.weight, bn_affine(sp.norm), bn_affine(sp.norm2)
            )
            deploy_mlp = DeployMLP(fc1, act, _conv_with(conv2, merged.weight, merged.bias), merged.shift)
        else:
            deploy_mlp = DeployMLP(fc1, act, conv2)
        mixing = DeployPartialMixing(mix.partial_conv3, mix.dim_untouched, attn)
        return cls(mixing, deploy_mlp, block.split_shortcut)

    def check_map_size(self, map_size: tuple[int, int], input_size: int) -> None:
        """Raise if this already-folded block was baked for another resolution than the one asked for now."""
        attn = self.spatial_mixing.attn
        baked = getattr(attn, "map_size", None)
        if baked is not None and baked != map_size:
            raise ValueError(
                f"this model was already reparameterized for input {attn.input_size} px ({baked[0]}x{baked[1]} "
                f"map here); it cannot be re-baked for input {input_size} px ({map_size[0]}x{map_size[1]}). "
                f"Reparameterize the training model instead."
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.split_shortcut:
            x = x + self.spatial_mixing(x)
            return x + self.mlp(x)
        return x + self.mlp(self.spatial_mixing(x))


def reparameterize_block(
    block: MLPBlock | DeployBlock, map_size: tuple[int, int], input_size: int
) -> DeployBlock:
    """The deploy form of one block for a `map_size` feature map; a block already in deploy form is returned as
    it is (idempotent), after checking it was folded for the same map."""
    if isinstance(block, DeployBlock):
        block.check_map_size(map_size, input_size)
        return block
    if isinstance(block, MLPBlock):
        return DeployBlock.from_block(block, map_size, input_size)
    raise TypeError(f"expected an MLPBlock or DeployBlock, got {type(block).__name__}")


# --------------------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReparamSummary:
    """What one reparameterization did, counted from the modules it replaced (for the export report).

    `params_after` counts parameters only: the baked attention biases are non-persistent buffers, so the iRPE
    tables (heads x 81 per PAT_sf block) leave the count.
    """

    input_size: int
    batchnorms_folded: int
    srm_gates_folded: int
    spatial_attn_merged: int
    layernorm_affines_folded: int
    attention_biases_baked: int
    params_before: int
    params_after: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _count(module: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stage_map_sizes(model: PartialNet, input_size: int) -> list[tuple[int, int]]:
    """Square map side at each BasicStage for a square input, following the actual down-sampling convs."""
    embed = model.patch_embed.proj if isinstance(model.patch_embed, PatchEmbed) else model.patch_embed
    side, stride = _out_size(input_size, embed), embed.stride[0]
    sizes: list[tuple[int, int]] = []
    for m in model.stages:
        if isinstance(m, (PatchMerging, nn.Conv2d)):
            conv = m.reduction if isinstance(m, PatchMerging) else m
            side, stride = _out_size(side, conv), stride * conv.stride[0]
        elif isinstance(m, BasicStage):
            if side < 1:
                raise ValueError(
                    f"input {input_size} px is too small: stage {len(sizes)} would have an empty map; "
                    f"this network down-samples by {stride}, so use at least {stride} px."
                )
            sizes.append((side, side))
    return sizes


def reparameterize_in_place(model: PartialNet, input_size: int) -> ReparamSummary:
    """Replace every foldable training module of `model` by its deploy form for a square `input_size` input.

    Idempotent: already-folded modules are kept as they are (a second call folds nothing and changes nothing).
    The model is left in eval mode.
    """
    if not isinstance(model, PartialNet):
        raise TypeError(f"expected a partialnet.model.PartialNet, got {type(model).__name__}")
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive int (pixels of the square input), got {input_size!r}")
    model.eval()
    params_before = _num_params(model)
    replaced = nn.ModuleList()  # collects the training modules that were folded away, to count what was done
    map_sizes = _stage_map_sizes(model, input_size)
    with torch.no_grad():
        if isinstance(model.patch_embed, PatchEmbed):
            replaced.append(model.patch_embed)
            model.patch_embed = fold_conv_norm(model.patch_embed.proj, model.patch_embed.norm)
        stage = 0
        for idx, m in enumerate(model.stages):
            if isinstance(m, PatchMerging):
                replaced.append(m)
                model.stages[idx] = fold_conv_norm(m.reduction, m.norm)
            elif isinstance(m, BasicStage):
                for j, blk in enumerate(m.blocks):
                    if isinstance(blk, MLPBlock):
                        replaced.append(blk)
                    m.blocks[j] = reparameterize_block(blk, map_sizes[stage], input_size)
                stage += 1
        # The deploy graph should hold no mutation at all, so exporters need not functionalise anything.
        for m in model.modules():
            if isinstance(m, nn.ReLU) and m.inplace:
                m.inplace = False
    leftover = [n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, SpatialAttention, LayerNorm2d))]
    if leftover:
        raise RuntimeError(f"reparameterization left training-only modules behind: {', '.join(leftover)}")
    model.eval()
    return ReparamSummary(
        input_size=input_size,
        batchnorms_folded=_count(replaced, nn.BatchNorm2d),
        srm_gates_folded=_count(replaced, SRM),
        spatial_attn_merged=_count(replaced, SpatialAttention),
        layernorm_affines_folded=sum(
            isinstance(m, nn.LayerNorm) and m.elementwise_affine for m in replaced.modules()
        ),
        attention_biases_baked=_count(replaced, RelativePositionBias),
        params_before=params_before,
        params_after=_num_params(model),
    )


def reparameterize_model_with_summary(model: PartialNet, input_size: int) -> tuple[PartialNet, ReparamSummary]:
    """A folded, eval-mode deep copy of `model` for `input_size` px, and what was folded; `model` is untouched."""
    deployed = copy.deepcopy(model)
    summary = reparameterize_in_place(deployed, input_size)
    _require_finite_after_folding(deployed)
    return deployed, summary


def _require_finite_after_folding(model: nn.Module) -> None:
    """Folding divides by sqrt(running_var + eps): finite weights can still fold into Inf or NaN."""
    from partialnet.arrays import describe_tensors, nonfinite_tensors
    from partialnet.errors import CheckpointError

    bad = nonfinite_tensors({**dict(model.named_parameters()), **dict(model.named_buffers())})
    if bad:
        raise CheckpointError(
            f"folding the normalizations into the convolutions gave NaN or Inf in {len(bad)} tensor(s): "
            f"{describe_tensors(bad)}; the checkpoint's BatchNorm statistics are out of range (a running_var at or "
            f"below -eps?). Export with --no-reparam to keep the training-form graph, or fix the checkpoint."
        )


def reparameterize_model(model: PartialNet, input_size: int) -> PartialNet:
    """A folded, eval-mode deep copy of `model` for `input_size` px; `model` itself is left untouched."""
    return reparameterize_model_with_summary(model, input_size)[0]


__all__ = [
    "DeployAttention",
    "DeployBlock",
    "DeployMLP",
    "DeployPartialMixing",
    "DeploySRMGate",
    "ReparamSummary",
    "SpatialMerge",
    "bn_affine",
    "fold_conv_bn",
    "fold_conv_norm",
    "fold_hardsigmoid",
    "fold_input_affine",
    "fold_qkv_layernorm",
    "merge_spatial_attention",
    "reparameterize_block",
    "reparameterize_in_place",
    "reparameterize_model",
    "reparameterize_model_with_summary",
]
