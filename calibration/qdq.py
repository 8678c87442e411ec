"""The explicit Q/DQ ONNX for TensorRT: symmetric int8 activations and weights, zero points 0, float bias.

Built by onnxruntime.quantization from the same calibration ranges and the same exclusion policy as the CPU
artifact, with TensorRT's recommended placement: a QuantizeLinear/DequantizeLinear pair on the inputs of each
weighted op (Conv, MatMul, Gemm) and per-channel int8 weights behind a DequantizeLinear, nothing on their outputs
and no quantized bias (TensorRT's parser takes no int32 DequantizeLinear). It is plain ONNX (no contrib ops), so it
also runs under onnxruntime on the CPU, which is how its accuracy is checked on a machine without a GPU.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


from .ort_int8 import TENSORRT_SCHEME, QuantizationError, QuantSession, write_quantized
from .policy import DEFAULT_POLICY, FloatPolicy
from .sources import ImageSet

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def check_qdq(path: str | Path) -> dict[str, Any]:
    """Verify a Q/DQ ONNX is what TensorRT's explicit quantization takes; returns counts, raises on a violation.

    Every zero point must be int8 and 0, every scale positive and finite, every weight DequantizeLinear int8 and
    per-channel on the weight's output axis, and no DequantizeLinear may produce a bias from int32.
    """
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant" and n.attribute}

    def value(name: str) -> tuple[np.ndarray, int] | None:
        t = inits.get(name) or consts.get(name)
        return (numpy_helper.to_array(t), t.data_type) if t is not None else None

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems: list[str] = []
    per_channel = 0
    for n in (n for n in proto.graph.node if n.op_type in QDQ_OPS):
        scale = value(n.input[1])
        if scale is None or not np.all(np.isfinite(scale[0])) or not np.all(scale[0] > 0):
            problems.append(f"{n.name}: scale is missing, non-finite or not positive")
        if len(n.input) > 2 and n.input[2]:
            zp = value(n.input[2])
            if zp is None or zp[1] != TensorProto.INT8 or np.any(zp[0] != 0):
                problems.append(f"{n.name}: zero point is not int8 0")
        elif n.op_type == "QuantizeLinear":
            problems.append(f"{n.name}: no zero point, so it quantizes to uint8")
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            w = inits[n.input[0]]
            if w.data_type == TensorProto.INT32:
                problems.append(f"{n.name}: dequantizes an int32 bias, which TensorRT cannot parse")
            elif w.data_type != TensorProto.INT8:
                problems.append(f"{n.name}: weight is {TensorProto.DataType.Name(w.data_type)}, not INT8")
            elif scale is not None and scale[0].size > 1:
                per_channel += 1
    ops = Counter(n.op_type for n in proto.graph.node)
    if problems:
        raise QuantizationError(
            f"{path} is not a valid TensorRT Q/DQ model: {len(problems)} problem(s), first: {problems[0]}."
        )
    return {
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "per_channel_weights": per_channel,
        "zero_points": "all int8 0",
        "contrib_ops": sorted({n.op_type for n in proto.graph.node if n.domain not in ("", "ai.onnx")}),
    }


def build_qdq(
    onnx_path: str | Path,
    dest: str | Path,
    calib: ImageSet,
    *,
    policy: FloatPolicy = DEFAULT_POLICY,
    method: str = "minmax",
    preprocess: Mapping[str, Any] | None = None,
    session: QuantSession | None = None,
    cache_dir: Path | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Write the symmetric explicit-Q/DQ ONNX (tensorrt/model.qdq.onnx) atomically and return what was done."""
    return write_quantized(onnx_path, dest, calib, TENSORRT_SCHEME, "int8-qdq", policy=policy, method=method,
                           preprocess=preprocess, session=session, cache_dir=cache_dir, metadata=metadata,
                           force=force, log=log, check=check_qdq)
