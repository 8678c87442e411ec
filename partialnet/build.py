"""One entry point from a variant name (and optionally a checkpoint) to a ready eval-mode model."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    Checkpoint,
    act_from_hparams,
    convert_dpconv,
    infer_config,
    is_dpconv,
    match_state_dict,
    read_checkpoint,
)
from .errors import CheckpointError
from .config import ArchConfig, variant_config
from .model import PartialNet
from .variants import Preprocess, Variant, get_variant, variant_for_shape


@dataclass
class LoadedModel:
    """A model with the facts every later step records: variant, architecture, where each came from."""

    model: PartialNet
    variant: Variant
    config: ArchConfig
    checkpoint: Checkpoint | None = None
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.checkpoint.sha256 if self.checkpoint else None

    # What the export pipeline reads of any model (partialnet.factory.FactoryModel has the same).

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def preprocess(self) -> Preprocess:
        return self.variant.preprocess

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def architecture(self) -> dict:
        return self.config.to_dict()

    @property
    def source(self) -> dict:
        """Where the weights and the architecture came from: what rebuilds the same eager model later."""
        ck = self.checkpoint
        return {
            "checkpoint": str(Path(ck.path).resolve()) if ck else None,
            "format": ck.format if ck else None,
            "seed": None if ck else 0,
            "spatial_attn": self.config.spatial_attn,
            "act": self.config.act,
            "sources": self.sources,
            "notes": self.notes,
        }

    def require_memory(self, input_size: int, batch: int, what: str) -> None:
        from .resources import require_memory

        require_memory(self.config, input_size, batch, what)


def init_weights(model: nn.Module, seed: int = 0) -> None:
    """Seeded variance-preserving weights (truncated normal, std 1/sqrt(fan_in)) for a model with no checkpoint.

    The official recipe (std 0.02, spec §2.7) is for training from scratch: with untrained BatchNorm statistics it
    shrinks activations layer by layer until all logits are nearly equal, which makes a freshly built model useless
    for drift and INT8 checks. Fan-in scaling keeps activations O(1) and the logits spread.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen).clamp_(-2, 2) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.zero_()


def _mismatch_hint(cfg: ArchConfig, ck_sd: dict, forced_sp: bool | None) -> str:
    has_sp = any(k.endswith("mlp.4.conv_attn.weight") for k in ck_sd)
    if forced_sp is True and not has_sp:
        return "The checkpoint has no PAT_sp weights (mlp.4.*): drop --spatial-attn, or pass --no-spatial-attn."
    if forced_sp is False and has_sp:
        return "The checkpoint has PAT_sp weights (mlp.4.*): drop --no-spatial-attn."
    fit = variant_for_shape(cfg.embed_dim, cfg.depths)
    where = f"its shape is {fit.name}'s" if fit else f"embed {cfg.embed_dim}, depths {list(cfg.depths)} is no listed variant"
    return f"The checkpoint mixes block types or is truncated ({where}); re-export it from the training run."


def build_model(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    spatial_attn: bool | None = None,
    num_classes: int | None = None,
    act: str | None = None,
    embed_dim: int | None = None,
    depths: tuple[int, int, int, int] | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
    log=None,
) -> LoadedModel:
    """Build a variant, freshly initialised or with a checkpoint's weights loaded strictly.

    With a checkpoint, the architecture comes from the weights (spec §3.1); the activation, which has no
    weights, comes from the checkpoint's hyper_parameters or else from the variant.
    """
    variant = get_variant(name)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if checkpoint is None:
        cfg = variant_config(
            variant, spatial_attn=spatial_attn, num_classes=num_classes, act=act, embed_dim=embed_dim, depths=depths
        )
        model = PartialNet(cfg)
        init_weights(model, seed)
        sources = {k: "variant" for k in ("embed_dim", "depths", "act", "spatial_attn", "num_heads", "num_classes")}
        for k, v in dict(spatial_attn=spatial_attn, num_classes=num_classes, act=act, embed_dim=embed_dim, depths=depths).items():
            if v is not None:
                sources[k] = "override"
        return LoadedModel(model.eval(), variant, cfg, None, sources, [f"freshly initialised (seed {seed}), no checkpoint"])

    if embed_dim is not None or depths is not None:
        raise CheckpointError("embed width and depths are read from the checkpoint; do not pass them with one.")
    ck = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
    sd = ck.state_dict
    hp_act = act_from_hparams(ck.hparams)
    if act is not None:
        act_used, act_src = act, "override"
    elif hp_act is not None:
        act_used, act_src = hp_act, "checkpoint hyper_parameters"
    else:
        act_used, act_src = variant.act, f"variant {variant.name} (weights do not determine it)"
    if ck.hparams.get("model_name") not in (None, "partialnet") and "patch_embed.proj.weight" not in sd:
        raise CheckpointError(
            f"{ck.path}: hyper_parameters say model_name={ck.hparams['model_name']!r} and the weights are not a "
            f"PartialNet (the official T0 cfg builds convnext_tiny; spec §1.1). Retrain with model_name: partialnet."
        )
    dpconv = is_dpconv(sd)
    if dpconv:
        sd = convert_dpconv(sd)
    inferred = infer_config(sd, act_used, act_src, spatial_attn=spatial_attn, dpconv=dpconv)
    cfg = inferred.config
    if num_classes is not None and num_classes != cfg.num_classes:
        raise CheckpointError(
            f"the checkpoint's head has {cfg.num_classes} classes but --num-classes {num_classes} was given; "
            f"drop --num-classes (it is read from the checkpoint)."
        )
    notes = list(ck.notes) + inferred.notes
    if (cfg.embed_dim, tuple(cfg.depths)) != (variant.embed_dim, tuple(variant.depths)):
        fit = variant_for_shape(cfg.embed_dim, cfg.depths)
        msg = (
            f"the checkpoint has embed {cfg.embed_dim}, depths {list(cfg.depths)}; {variant.name} lists embed "
            f"{variant.embed_dim}, depths {list(variant.depths)}. Using the checkpoint's shape"
            + (f" (it is {fit.name}'s)." if fit else ".")
        )
        notes.append(msg)
        log(f"note: {msg}")
    model = PartialNet(cfg)
    full = match_state_dict(
        model, sd, what=f"checkpoint {ck.path}", hint=_mismatch_hint(cfg, sd, spatial_attn)
    )
    model.load_state_dict(full, strict=True)
    return LoadedModel(model.eval(), variant, cfg, ck, inferred.sources, notes)
