"""Checkpoint containers, strict matching and the errors a user sees."""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from partialnet import CheckpointError, build_model
from partialnet.checkpoint import group_keys, read_checkpoint
from partialnet.model import ArchConfig, PartialNet

from helpers import randomize_

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _trained(name="partialnet_t0", sp=True, classes=1000, seed=0):
    model = build_model(name, spatial_attn=sp, num_classes=classes).model
    return randomize_(model, seed)


def _same_logits(a, b):
    with torch.no_grad():
        return torch.equal(a(X), b(X))


@pytest.fixture(scope="module")
def t0_sp():
    return _trained("partialnet_t0", True)


def _lightning(model, **hp):
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd["criterion.teacher_model.fc.weight"] = torch.zeros(3, 3)  # distillation leftovers are not ours
    sd["criterion.teacher_model.fc.bias"] = torch.zeros(3)
    return {"state_dict": sd, "hyper_parameters": hp, "epoch": 3, "global_step": 10,
            "pytorch-lightning_version": "1.9.0", "optimizer_states": [], "lr_schedulers": []}


def test_lightning_ckpt_with_teacher_keys_and_hparams(tmp_path, t0_sp):
    path = tmp_path / "t0.ckpt"
    torch.save(_lightning(t0_sp, act_layer="GELU", model_name="partialnet", use_spatial_attn=True), path)
    lm = build_model("partialnet_t0", path)
    assert lm.checkpoint.format == "lightning"
    assert len(lm.checkpoint.ignored_keys) == 2
    assert any("distillation teacher" in n for n in lm.notes)
    assert lm.sources["act"] == "checkpoint hyper_parameters"
    assert _same_logits(lm.model, t0_sp)


def test_act_comes_from_hparams_over_the_variant(tmp_path):
    relu_model = randomize_(PartialNet(ArchConfig(embed_dim=32, depths=(1, 2, 8, 2), act="relu")))
    path = tmp_path / "t0_relu.ckpt"
    torch.save(_lightning(relu_model, act_layer="RELU"), path)
    lm = build_model("partialnet_t0", path)  # the T0 table says GELU
    assert lm.config.act == "relu"
    assert _same_logits(lm.model, relu_model)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp", "ddp_in_model"])
def test_container_forms(tmp_path, t0_sp, wrap):
    sd = t0_sp.state_dict()
    obj = {
        "plain": sd,
        "model": {"model": sd, "epoch": 1},
        "state_dict": {"state_dict": sd},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "ddp_in_model": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / f"{wrap}.pth"
    torch.save(obj, path)
    lm = build_model("partialnet_t0", path)
    assert _same_logits(lm.model, t0_sp)
    if wrap.startswith("ddp"):
        assert any("'module.'" in n for n in lm.notes)


def test_safetensors_with_act_metadata(tmp_path):
    model = _trained("partialnet_t2", sp=False, classes=100)
    path = tmp_path / "t2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"act_layer": "RELU"})
    lm = build_model("partialnet_t2", path)
    assert lm.checkpoint.format == "safetensors"
    assert lm.config.num_classes == 100 and lm.config.spatial_attn is False
    assert _same_logits(lm.model, model)


def test_detects_pat_sp_classes_and_shape(tmp_path):
    model = _trained("partialnet_t1", sp=False, classes=37)
    path = tmp_path / "t1.pth"
    torch.save(model.state_dict(), path)
    lm = build_model("partialnet_t1", path)
    assert (lm.config.spatial_attn, lm.config.num_classes, lm.config.embed_dim) == (False, 37, 48)
    sp_path = tmp_path / "t1sp.pth"
    torch.save(_trained("partialnet_t1", sp=True).state_dict(), sp_path)
    assert build_model("partialnet_t1", sp_path).config.spatial_attn is True


def test_missing_num_batches_tracked_is_tolerated(tmp_path, t0_sp):
    sd = {k: v for k, v in t0_sp.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "nbt.pth"
    torch.save(sd, path)
    assert _same_logits(build_model("partialnet_t0", path).model, t0_sp)


def test_strict_mismatch_error_groups_keys_and_suggests_the_flag(tmp_path, t0_sp):
    path = tmp_path / "t0sp.pth"
    torch.save(t0_sp.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        build_model("partialnet_t0", path, spatial_attn=False)
    msg = str(e.value)
    assert "420 keys in the checkpoint, 264 expected" in msg
    assert "Unexpected 156: stages.{0,2,4,6}.blocks.*.mlp.4.*: 156 keys (PAT_sp)." in msg
    assert "drop --no-spatial-attn" in msg


def test_strict_mismatch_on_truncated_state_dict(tmp_path, t0_sp):
    sd = dict(t0_sp.state_dict())
    for k in [k for k in sd if k.startswith("stages.6.blocks.1.spatial_mixing.attn.")]:
        del sd[k]
    sd["stages.2.blocks.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "cut.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        build_model("partialnet_t0", path)
    msg = str(e.value)
    assert ("Missing 4: stages.6.blocks.1.spatial_mixing.attn.proj.*: 2 keys (PAT_sf); "
            "stages.6.blocks.1.spatial_mixing.attn.qkv.*: 1 key (PAT_sf); "
            "stages.6.blocks.1.spatial_mixing.attn.rpe_k.*: 1 key (PAT_sf iRPE).") in msg
    assert "Unexpected 1: stages.2.blocks.0.extra.*: 1 key." in msg
    assert "its shape is partialnet_t0's" in msg


def test_wrong_shape_is_reported(tmp_path, t0_sp):
    sd = dict(t0_sp.state_dict())
    sd["stages.0.blocks.0.mlp.0.weight"] = torch.zeros(64, 32, 3, 3)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"Wrong shape 1: stages.0.blocks.0.mlp.0.weight: checkpoint \[64, 32, 3, 3\], model \[64, 32, 1, 1\]"):
        build_model("partialnet_t0", path)


def test_group_keys_collapses_blocks_and_stages():
    keys = ["stages.0.blocks.0.mlp.4.conv.weight", "stages.2.blocks.1.mlp.4.norm.bias", "head.weight"]
    assert group_keys(keys) == ["head.*: 1 key (classifier)", "stages.{0,2}.blocks.{0,1}.mlp.4.*: 2 keys (PAT_sp)"]
    many = [f"stages.4.blocks.{j}.mlp.4.conv.weight" for j in range(8)] + ["stages.3.norm.weight"]
    assert group_keys(many) == ["stages.4.blocks.*.mlp.4.*: 8 keys (PAT_sp)", "stages.3.norm.*: 1 key"]


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused_by_default_and_named(tmp_path, t0_sp, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": t0_sp.state_dict(), "extra": Evil()}, path)
    with pytest.raises(CheckpointError) as e:
        build_model("partialnet_t0", path)
    msg = str(e.value)
    assert "would run pickled code" in msg and "builtins.print" in msg and "--allow-pickle" in msg
    assert "this must never run" not in capsys.readouterr().out


def test_allow_pickle_loads_a_trusted_file(tmp_path, t0_sp):
    path = tmp_path / "module.pth"
    torch.save({"model": t0_sp}, path)  # a whole pickled nn.Module
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        build_model("partialnet_t0", path)
    assert _same_logits(build_model("partialnet_t0", path, allow_pickle=True).model, t0_sp)


def test_argparse_namespace_hparams_load_without_running_code(tmp_path, t0_sp):
    path = tmp_path / "ns.ckpt"
    ck = _lightning(t0_sp)
    ck["hyper_parameters"] = argparse.Namespace(act_layer="GELU", embed_dim=32)
    torch.save(ck, path)
    lm = build_model("partialnet_t0", path)
    assert lm.checkpoint.hparams["embed_dim"] == 32 and lm.sources["act"] == "checkpoint hyper_parameters"


@pytest.mark.parametrize("content,needle", [
    (b"", "not a readable PyTorch checkpoint"),
    (b"hello, this is not a checkpoint at all", "not a readable PyTorch checkpoint"),
])
def test_unreadable_files(tmp_path, content, needle):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        read_checkpoint(path)


def test_truncated_checkpoint(tmp_path, t0_sp):
    path = tmp_path / "trunc.pth"
    torch.save(t0_sp.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="Is the file complete"):
        read_checkpoint(path)


def test_missing_file_and_non_partialnet(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not a PartialNet state dict"):
        build_model("partialnet_t0", path)


def test_convnext_from_the_t0_cfg_bug_is_explained(tmp_path):
    path = tmp_path / "convnext.ckpt"
    torch.save({"state_dict": {"model.downsample_layers.0.0.weight": torch.zeros(1)},
                "hyper_parameters": {"model_name": "convnext_tiny"}}, path)
    with pytest.raises(CheckpointError, match="convnext_tiny"):
        build_model("partialnet_t0", path)


def test_checkpoint_shape_wins_over_variant_with_a_note(tmp_path):
    model = randomize_(PartialNet(ArchConfig(embed_dim=40, depths=(1, 2, 8, 2))))  # the "T0 is embed 40" question
    path = tmp_path / "t0_40.pth"
    torch.save(model.state_dict(), path)
    notes = []
    lm = build_model("partialnet_t0", path, log=notes.append)
    assert lm.config.embed_dim == 40 and _same_logits(lm.model, model)
    assert notes and "embed 40" in notes[0]


# ---------------------------------------------------------------- DPConv (spec §5.3)


def _dpconv_state_dict(pconv_model: PartialNet, full_c: dict) -> dict:
    """Write a plain-partial-conv model's weights in DPConv form: a full C x C kernel whose top-left is used."""
    sd = {}
    gen = torch.Generator().manual_seed(3)
    for k, v in pconv_model.state_dict().items():
        if k.endswith("spatial_mixing.partial_conv3.weight"):
            prefix = k[: -len(".partial_conv3.weight")]
            c = full_c[prefix.split(".blocks")[0]]
            full = torch.randn(c, c, 3, 3, generator=gen)
            full[: v.shape[0], : v.shape[1]] = v
            n_neg = (c // v.shape[0]).bit_length() - 1
            k_bits = c.bit_length() - 1
            sd[f"{prefix}.conv.weight"] = full
            sd[f"{prefix}.gate"] = torch.tensor([-1.0] * n_neg + [1.0] * (k_bits - n_neg))
            sd[f"{prefix}.I"] = torch.eye(2)
            sd[f"{prefix}.one"] = torch.ones(2, 2)
            sd[f"{prefix}.c_div"] = torch.tensor(c // v.shape[0], dtype=torch.int32)
            sd[f"{prefix}.one_channel"] = torch.tensor(v.shape[0], dtype=torch.int32)
        else:
            sd[k] = v
    return sd


def test_dpconv_checkpoint_converts_to_the_official_eval_forward(tmp_path):
    dims = ((8,), (16, 8), (32,) * 8, (64, 128))
    cfg = ArchConfig(embed_dim=32, depths=(1, 2, 8, 2), spatial_attn=False, mixing="pconv", partial_dims=dims)
    ref = randomize_(PartialNet(cfg))
    sd = _dpconv_state_dict(ref, {"stages.0": 32, "stages.2": 64, "stages.4": 128, "stages.6": 256})
    path = tmp_path / "dp.pth"
    torch.save(sd, path)
    lm = build_model("partialnet_t0", path)
    assert lm.config.mixing == "pconv" and lm.config.partial_dims == dims
    assert any("DPConv" in n for n in lm.notes)
    assert _same_logits(lm.model, ref)
    # The official eval forward of a stage-3 DPConv block: x + cat(conv(x1), x2), i.e. cat(x1 + conv(x1), 2 x2).
    blk = lm.model.stages[6].blocks[0]
    x = torch.randn(1, 256, 2, 2)
    dc = 64
    with torch.no_grad():
        w = sd["stages.6.blocks.0.spatial_mixing.conv.weight"][:dc, :dc]
        mixed = torch.cat([x[:, :dc] + torch.nn.functional.conv2d(x[:, :dc], w, padding=1), 2 * x[:, dc:]], 1)
        assert torch.allclose(blk(x), mixed + blk.mlp(mixed), atol=1e-5)
