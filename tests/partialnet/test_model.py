"""The model family against the spec: state-dict layout, parameter and MAC counts, iRPE buckets, forward."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from partialnet import VARIANTS, ArchConfig, PartialNet, UsageError, build_model, get_variant
from partialnet.irpe import bucket_ids
from partialnet.config import variant_config
from partialnet.cost import mac_count, param_count
from partialnet.profile import count_macs, count_params

DATA = Path(__file__).parents[1] / "data"


def _appendix_a() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (DATA / "t0_pat_sp_state_dict.txt").read_text().splitlines():
        parts = line.split()
        shape = () if parts[1] == "scalar" else tuple(int(s) for s in parts[1].split("x"))
        rows.append((parts[0], shape))
    return rows


def _layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_t0_with_pat_sp_state_dict_equals_appendix_a_in_order():
    expected = _appendix_a()
    assert len(expected) == 420
    assert _layout(build_model("partialnet_t0", spatial_attn=True).model) == expected


def test_t0_without_pat_sp_is_appendix_a_minus_mlp4():
    expected = [
        (k, s) for k, s in _appendix_a() if ".mlp.4." not in k
    ]
    assert len(expected) == 264
    assert _layout(build_model("partialnet_t0", spatial_attn=False).model) == expected


def test_num_batches_tracked_are_int64_scalars():
    sd = build_model("partialnet_t0").model.state_dict()
    counters = [v for k, v in sd.items() if k.endswith("num_batches_tracked")]
    assert counters and all(v.dtype == torch.int64 and v.ndim == 0 for v in counters)


# spec §1.4: params (no PAT_sp, PAT_sp), fvcore MACs at 224 (no PAT_sp, PAT_sp), state-dict keys (no sp, sp)
SPEC_1_4 = {
    "partialnet_t0": (3.486, 3.558, 235.4, 246.9, 264, 420),
    "partialnet_t1": (5.986, 6.145, 520.7, 545.8, 264, 420),
    "partialnet_t2": (12.270, 12.650, 1039.1, 1086.6, 273, 441),
    "partialnet_s": (28.013, 28.976, 2715.6, 2842.7, 330, 534),
    "partialnet_m": (59.179, 61.367, 6692.5, 7021.7, 482, 782),
    "partialnet_l": (100.641, 104.465, 11908.9, 12502.2, 558, 906),
}


@pytest.mark.parametrize("name", list(SPEC_1_4))
def test_params_macs_and_key_counts_match_spec(name):
    p0, p1, m0, m1, k0, k1 = SPEC_1_4[name]
    for sp, params, macs, keys in ((False, p0, m0, k0), (True, p1, m1, k1)):
        model = build_model(name, spatial_attn=sp).model
        assert round(count_params(model) / 1e6, 3) == pytest.approx(params, abs=1e-9)
        assert round(count_macs(model, 224) / 1e6, 1) == pytest.approx(macs, abs=1e-9)
        assert len(model.state_dict()) == keys


@pytest.mark.parametrize("cfg", [
    *(variant_config(v, spatial_attn=sp) for v in VARIANTS.values() for sp in (True, False)),
    ArchConfig(embed_dim=40, depths=(1, 2, 3, 1), act="relu", num_classes=10, partial_dims=((8,), (16, 24), (20, 20, 40), (80,))),
    ArchConfig(embed_dim=16, depths=(1, 1, 2, 1), mixing="pconv", num_classes=7),
], ids=lambda c: f"e{c.embed_dim}-{'-'.join(map(str, c.depths))}-sp{int(c.spatial_attn)}-{c.mixing}")
def test_counts_from_the_config_equal_the_models(cfg):
    """`deploy list` counts without torch (partialnet.cost); the hooks on the real module tree must agree."""
    with torch.device("meta"):
        model = PartialNet(cfg)
    assert param_count(cfg) == count_params(model)
    for size in (64, 224, 256):
        assert mac_count(cfg, size) == count_macs(model, size)


def test_variants_default_to_pat_sp_and_four_heads():
    assert [v.name for v in VARIANTS.values()] == [
        "partialnet_t0", "partialnet_t1", "partialnet_t2", "partialnet_s", "partialnet_m", "partialnet_l"
    ]
    assert all(v.spatial_attn and v.num_heads == 4 for v in VARIANTS.values())
    assert [VARIANTS[n].act for n in ("partialnet_t0", "partialnet_t1", "partialnet_t2")] == ["gelu", "gelu", "relu"]


def test_unknown_variant_names_the_closest_and_lists_all():
    with pytest.raises(UsageError) as e:
        get_variant("partialnet-t1")
    msg = str(e.value)
    assert "Did you mean partialnet_t1?" in msg and "partialnet_l" in msg


# spec §4.2: bucket ranges for square maps
@pytest.mark.parametrize("side,lo,hi,used", [(6, 40, 47, 8), (7, 40, 48, 9), (8, 40, 50, None), (16, 40, 60, None)])
def test_irpe_bucket_ranges(side, lo, hi, used):
    ids = bucket_ids(side, side)
    assert ids.shape == (side * side, side * side)
    assert int(ids.min()) == lo and int(ids.max()) == hi
    if used is not None:
        assert len(torch.unique(ids)) == used
    assert torch.equal(ids, ids.T)
    assert torch.all(ids.diagonal() == 40)


def test_irpe_piecewise_log_region():
    # On a 1 x 64 row the distance is |c_i - c_j|: exact up to 20, then 20 + 20*ln(d/20)/ln(8), capped at 40.
    ids = bucket_ids(1, 64)[0] - 40
    assert ids[:21].tolist() == list(range(21))
    import math

    for d in (21, 30, 45, 63):
        assert int(ids[d]) == min(40, round(20 + 20 * math.log(d / 20) / math.log(8)))
    # rectangular maps use row-major tokens: token (r, c) = r * w + c
    rect = bucket_ids(7, 10)
    assert int(rect[0, 10]) == 41 and int(rect[0, 11]) == 41  # (0,0)-(1,0): d=1; (0,0)-(1,1): round(1.414)=1


def test_attention_bias_follows_the_table():
    model = build_model("partialnet_t0").model
    rpe = model.stages[6].blocks[0].spatial_mixing.attn.rpe_k
    with torch.no_grad():
        rpe.lookup_table_bias.copy_(torch.arange(4 * 81, dtype=torch.float32).view(4, 81))
    bias = rpe(7, 7)
    assert bias.shape == (1, 4, 49, 49)
    ids = bucket_ids(7, 7)
    assert torch.equal(bias[0, 2], (2 * 81 + ids).float())


@pytest.mark.parametrize("size", [64, 96, 128])
def test_forward_at_multiples_of_32(size):
    model = build_model("partialnet_t0", num_classes=10).model
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_custom_widths_and_depths_from_python_api():
    cfg = ArchConfig(embed_dim=16, depths=(1, 1, 2, 1), act="relu", spatial_attn=False, num_classes=7,
                     partial_dims=((4,), (8,), (8, 16), (32,)))
    model = PartialNet(cfg)
    assert model.stages[4].blocks[1].spatial_mixing.partial_conv3.weight.shape == (16, 16, 3, 3)
    assert model.stages[6].blocks[0].spatial_mixing.attn.qkv.weight.shape == (3 * 96, 96)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_split_shortcut_only_in_last_stage():
    model = build_model("partialnet_t2").model
    flags = [blk.split_shortcut for s in (0, 2, 4, 6) for blk in model.stages[s].blocks]
    assert flags == [False] * 10 + [True] * 4


def test_irpe_buckets_equal_the_official_tables():
    # Tables written by the official iRPE code (tests/data/official/README.json), including the log branch (21x21, 24x24).
    tables = np.load(Path(__file__).parents[1] / "data" / "official" / "rpe_buckets.npz")
    assert len(tables.files) == 8
    for key in tables.files:
        h, w = (int(v) for v in key[1:].split("x"))
        assert np.array_equal(bucket_ids(h, w).numpy(), tables[key]), key
