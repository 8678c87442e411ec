"""The attention-module conformance suite and the PATConv zoo in FP32: each folded, exported to ONNX and run in
ONNX Runtime at batch 1 and 8 against eager, with randomized BatchNorms (small inputs, CPU). The INT8 rows are in
benchmarks/MODULES.md; tests/deploy/test_factory.py runs INT8 end to end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.fold import fold_model
from export.to_onnx import export_onnx
from helpers import randomize_
from partialnet.attention import ATTENTION, FACTORIES
from partialnet.zoo import mobilenetv2_pat, resnet50_pat
from runtimes.ort import OrtRunner

RTOL = 1e-4  # ONNX Runtime's fp32 kernels reorder sums: relative to the largest logit


def exported_error(model: nn.Module, size: int, tmp_path) -> tuple[float, onnx.ModelProto]:
    model = randomize_(model, 1).eval()
    folded, _ = fold_model(model, size)
    proto = export_onnx(folded, tmp_path / "m.onnx", size)
    runner = OrtRunner(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    worst = 0.0
    for batch in (1, 8):
        got = runner.run({"input": x[:batch]})["logits"]
        worst = max(worst, float(np.abs(got - ref[:batch]).max() / np.abs(ref[:batch]).max()))
    runner.close()
    return worst, proto


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_module_exports_exactly(name, tmp_path):
    err, proto = exported_error(FACTORIES[name](), 32, tmp_path)
    assert err < RTOL, f"{name}: {err}"
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("build", [resnet50_pat, mobilenetv2_pat])
def test_zoo_model_exports_exactly(build, tmp_path):
    err, proto = exported_error(build(num_classes=10), 64, tmp_path)  # PATConv's SRM std needs maps over 1x1
    assert err < RTOL, err
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
