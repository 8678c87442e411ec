"""ONNX Runtime INT8 (calibration/ort_int8.py and its rewrites): QDQ structure, agreement with FP32, exact kernels.

The model is PartialNet-T0 with randomized BatchNorm statistics, affines and iRPE tables, 10 classes, exported at
64 px (tests/calibration/conftest.py).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from calibration.ort_int8 import QuantSession, quantize_ort
from calibration.policy import NO_EXCLUSIONS
from calibration.rewrites import fuse_gelu, rescale_gate_rows, split_gate_rows
from calibration.sources import ImageSet, default_images
from export.to_onnx import export_onnx
from partialnet.errors import UsageError
from partialnet.variants import Preprocess
from runtimes.cpu import int8_dot_saturates
from runtimes.ort import OrtRunner

from int8_fixtures import CALIB, MIN_AGREEMENT, MIN_COSINE, ort_logits, agreement, dq_fed_inputs



# --------------------------------------------------------------------------------------------------------
# onnxruntime INT8
# --------------------------------------------------------------------------------------------------------


def test_rewrites_are_exact(folder, calib, session):
    x = calib.images[:4]
    ref = ort_logits(folder / "model.onnx", x)

    def run(proto: onnx.ModelProto) -> np.ndarray:
        onnx.checker.check_model(proto, full_check=True)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0]

    fused = onnx.load(str(folder / "model.onnx"))
    assert fuse_gelu(fused) == 14  # 13 blocks + the head
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Gelu"] == 14 and "Erf" not in ops
    assert np.abs(run(fused) - ref).max() < 1e-4

    split = onnx.load(str(folder / "model.onnx"))
    assert split_gate_rows(split) == 13  # PAT_sp in every block
    inits = {t.name: tuple(t.dims) for t in split.graph.initializer}
    gates = [n for n in split.graph.node if n.name.endswith("/mlp/fc2/Conv_gate")]
    fc2 = [n for n in split.graph.node if n.name.endswith("/mlp/fc2/Conv")]
    assert len(gates) == len(fc2) == 13 and all(inits[n.input[1]][0] == 1 for n in gates)
    assert sorted({inits[n.input[1]][0] for n in fc2}) == [32, 64, 128, 256]  # C rows, no longer C + 1
    assert np.abs(run(split) - ref).max() < 1e-4

    rescaled = onnx.load(str(folder / "model.onnx"))
    ranges = session.range_values()
    assert rescale_gate_rows(rescaled, ranges) == 13
    hsig = [n for n in rescaled.graph.node if n.op_type == "HardSigmoid"]
    assert len(hsig) == 13 and all(n.name.endswith("/mlp/Clip") for n in hsig)
    alphas = {n.name: n.attribute[0].f for n in hsig}
    fc2_max = {n.name: ranges[n.output[0]][1] for n in rescaled.graph.node if n.name.endswith("/mlp/fc2/Conv")}
    assert all(abs(alphas[n.replace("/fc2/Conv", "/Clip")] * m - 1) < 1e-6 for n, m in fc2_max.items())
    assert np.abs(run(rescaled) - ref).max() < 1e-4


def test_ort_int8_structure(ort_int8):
    path, info = ort_int8
    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] == info["quantize_linear"] > 0 and ops["DequantizeLinear"] > 0
    assert ops["Gelu"] == 14 and "Erf" not in ops
    fed = dq_fed_inputs(proto)
    excluded = set(info["excluded_node_names"])
    weighted = [n for n in proto.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    floats = [n.name for n in weighted if fed[n.name] == 0]
    assert sorted(floats) == sorted(n.name for n in weighted if n.name in excluded)
    # the SRM cfc1 convs, the head conv and Linear, q@k and attn@v of the two PAT_sf blocks (act_matmul)
    assert len(floats) == 11 + 2 + 4 == info["weighted_ops_float"]
    assert info["gelu_fused"] == 14 and info["gate_rows_rescaled"] == 13 and ops["HardSigmoid"] == 13
    assert all(fed[n.name] >= 2 for n in weighted if n.name not in excluded)  # activation and weight through DQ
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["partialnet.precision"] == "int8" and meta["partialnet.variant"] == "t0"
    assert json.loads(meta["partialnet.quantization"])["scheme"] == "onnxruntime-cpu"
    assert info["pre_processing"]["applied"] is True and info["calibration"]["size"] == CALIB


def test_ort_int8_agrees_with_fp32(ort_int8, calib, ref):
    top1, cos = agreement(ref, ort_logits(ort_int8[0], calib.images))
    assert top1 >= MIN_AGREEMENT and cos >= MIN_COSINE


def test_ort_runner_takes_exact_int8_kernels_where_u8s8_saturates(ort_int8, calib, ref):
    """On an x86 CPU without VNNI the runner turns on ONNX Runtime's U8U8 kernels by itself; forced on anywhere,
    they give the same numbers as the simulated quantization (no graph optimization: float Q/DQ arithmetic)."""
    path = ort_int8[0]
    assert OrtRunner(path, precision="int8").options["exact_int8"] == int8_dot_saturates()
    assert OrtRunner(path, precision="fp32").options["exact_int8"] is False  # nothing to saturate in a float graph
    simulated = ort_logits(path, calib.images, graph_optimization="disabled")
    exact = ort_logits(path, calib.images, exact_int8=True)
    scale = np.abs(simulated).max()
    assert np.abs(exact - simulated).max() <= 0.02 * scale  # requantization rounding only, no saturation
    assert agreement(ref, exact)[1] >= MIN_COSINE


def test_ort_int8_refuses_to_overwrite_and_checks_inputs(ort_int8, folder, calib, pp, session):
    path, _ = ort_int8
    with pytest.raises(UsageError, match=r"model.int8.onnx exists; pass --force to overwrite it\."):
        quantize_ort(folder / "model.onnx", path, calib, session=session)
    with pytest.raises(UsageError, match=r"calibration method 'kl' is not one of minmax, entropy, percentile"):
        QuantSession(folder / "model.onnx", calib, "kl")
    wrong = default_images(2, Preprocess(input_size=96))
    with pytest.raises(UsageError, match=r"calibration images are 96x96 but the model takes 64x64"):
        QuantSession(folder / "model.onnx", wrong)


MYNET = Path(__file__).resolve().parents[1] / "data" / "mynet.py"


class _SharedConvNet(torch.nn.Module):
    """One 1x1 conv applied to two inputs (as CBAM's MLP reads the average- and the max-pooled map)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.shared = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.shared(h) + self.shared(torch.nn.functional.max_pool2d(h, 3, 1, 1))
        return self.head(y.mean(dim=(2, 3)))


def test_a_weight_two_convs_share_loads_with_exact_int8_kernels(tmp_path):
    """ONNX Runtime's exact int8 mode (on by itself on CPUs without VNNI) converted a shared int8 weight once per
    conv under one name and refused to load the file; every reader now has its own copy."""
    export_onnx(_SharedConvNet().eval(), tmp_path / "shared.onnx", 16)
    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    info = quantize_ort(tmp_path / "shared.onnx", tmp_path / "shared.int8.onnx", ImageSet(x, "random"),
                        policy=NO_EXCLUSIONS)
    assert info["weight_copies"] == 1
    proto = onnx.load(str(tmp_path / "shared.int8.onnx"))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 and len({n.input[1] for n in convs}) == 3  # each conv reads a weight of its own
    simulated = ort_logits(tmp_path / "shared.int8.onnx", x, graph_optimization="disabled")
    exact = ort_logits(tmp_path / "shared.int8.onnx", x, exact_int8=True)
    assert np.abs(exact - simulated).max() <= 0.02 * np.abs(simulated).max()


def test_pre_processing_goes_on_without_symbolic_shape_inference_where_that_fails(tmp_path):
    """ONNX Runtime's symbolic shape inference fails on a Concat in the user model of tests/data/mynet.py; the
    pre-processing then runs with ONNX's own shape inference alone, and the record says so."""
    from calibration.ort_int8 import pre_process
    from export.fold import deploy_form
    from partialnet.factory import build_from_factory

    model = build_from_factory(f"{MYNET}:build", num_classes=10).model.eval()
    export_onnx(deploy_form(model, 64)[0], tmp_path / "mynet.onnx", 64)  # as deploy export folds and exports it
    info = pre_process(tmp_path / "mynet.onnx", tmp_path / "prepared.onnx")
    assert info["applied"] is True
    assert info["symbolic_shape_inference"].startswith("skipped: it failed (TypeError")
    onnx.checker.check_model(str(tmp_path / "prepared.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    before, after = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                     for p in (tmp_path / "mynet.onnx", tmp_path / "prepared.onnx"))
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
