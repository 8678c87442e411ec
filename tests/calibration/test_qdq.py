"""The symmetric explicit-Q/DQ ONNX for TensorRT (calibration/qdq.py), run and checked under ONNX Runtime.

The model is PartialNet-T0 with randomized BatchNorm statistics, affines and iRPE tables, 10 classes, exported at
64 px (tests/calibration/conftest.py).
"""
from __future__ import annotations


import onnx
import pytest

from calibration.ort_int8 import QuantizationError
from calibration.qdq import check_qdq
from int8_fixtures import MIN_AGREEMENT, MIN_COSINE, ort_logits, agreement, dq_fed_inputs



# --------------------------------------------------------------------------------------------------------
# the explicit Q/DQ ONNX for TensorRT
# --------------------------------------------------------------------------------------------------------


def test_qdq_is_symmetric_int8_on_weighted_inputs(qdq, graph):
    path, info = qdq
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    qdq_nodes = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq_nodes
    for n in qdq_nodes:
        zp = onnx.numpy_helper.to_array(inits[n.input[2]])
        assert inits[n.input[2]].data_type == onnx.TensorProto.INT8 and not zp.any()
    consumers = {i: n for n in proto.graph.node for i in n.input}
    # Q/DQ only in front of weighted ops: every DequantizeLinear feeds a Conv, MatMul or Gemm
    assert {consumers[n.output[0]].op_type for n in qdq_nodes if n.op_type == "DequantizeLinear"} <= {"Conv", "MatMul", "Gemm"}
    assert not any(inits[n.input[0]].data_type == onnx.TensorProto.INT32 for n in qdq_nodes if n.input[0] in inits)
    assert info["structure"]["per_channel_weights"] == 60 - 11 - 2  # T0's weighted ops minus SRM and head
    assert info["structure"]["contrib_ops"] == []
    fed = dq_fed_inputs(proto)
    assert all(fed[n] == 0 for n in info["excluded_node_names"] if n in fed)


def test_qdq_runs_on_cpu_and_agrees(qdq, calib, ref):
    top1, cos = agreement(ref, ort_logits(qdq[0], calib.images))
    assert top1 >= MIN_AGREEMENT and cos >= MIN_COSINE


def test_check_qdq_rejects_the_asymmetric_cpu_model(ort_int8):
    with pytest.raises(QuantizationError, match=r"is not a valid TensorRT Q/DQ model: \d+ problem\(s\), first: .*"
                                                 r"(zero point is not int8 0|int32 bias)"):
        check_qdq(ort_int8[0])
