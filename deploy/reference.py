"""Rebuilding the eager reference model an export folder was made from."""
from __future__ import annotations

from pathlib import Path

import torch

from export.manifest import Manifest
from partialnet import CheckpointError, build_model


def eager_from_manifest(manifest: Manifest, *, allow_pickle: bool = False, log=None) -> torch.nn.Module:
    """The same weights the export used: its checkpoint (hash-checked) or the same seeded fresh model."""
    src = manifest.source
    if src.get("kind") == "factory":
        from partialnet.factory import rebuild

        return rebuild(src, allow_pickle=allow_pickle)
    ckpt = src.get("checkpoint")
    if ckpt:
        if not Path(ckpt).is_file():
            raise CheckpointError(
                f"the export's checkpoint {ckpt} is gone; the eager reference needs it (sha256 {manifest.checkpoint_sha256})."
            )
        lm = build_model(manifest.variant, ckpt, spatial_attn=src.get("spatial_attn"), act=src.get("act"),
                         allow_pickle=allow_pickle, log=log or (lambda m: None))
        if lm.checkpoint_sha256 != manifest.checkpoint_sha256:
            raise CheckpointError(
                f"{ckpt} changed since the export (sha256 {lm.checkpoint_sha256[:12]}..., export recorded "
                f"{str(manifest.checkpoint_sha256)[:12]}...); re-export with --force."
            )
        return lm.model
    arch = manifest.architecture
    lm = build_model(manifest.variant, spatial_attn=arch["spatial_attn"], num_classes=arch["num_classes"],
                     act=arch["act"], embed_dim=arch["embed_dim"], depths=tuple(arch["depths"]),
                     seed=int(src.get("seed") or 0), log=log)
    return lm.model
