"""Constants and helpers shared by the INT8 tests (tests/calibration, tests/deploy/test_int8_build.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from runtimes.compare import Drift
from runtimes.ort import OrtRunner


SIZE = 64
CLASSES = 10
CALIB = 32
MIN_AGREEMENT = 0.9  # top-1 agreement with FP32 on the calibration images (measured 1.0)
MIN_COSINE = 0.995  # mean logit cosine with FP32 on the calibration images (measured >= 0.9987)
T0_UNITS = (["patch_embed", "stages.0.blocks.0", "stages.1", "stages.2.blocks.0", "stages.2.blocks.1", "stages.3"]
            + [f"stages.4.blocks.{j}" for j in range(8)] + ["stages.5", "stages.6.blocks.0", "stages.6.blocks.1", "head"])
BLOCK = "stages.4.blocks.3"



def ort_logits(path: Path, x: np.ndarray, **options) -> np.ndarray:
    """INT8 logits the way users get them: through the runner, which picks exact kernels on a CPU without VNNI."""
    runner = OrtRunner(path, precision="int8", **options)
    return runner.run({"input": x})["logits"]


def agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    d = Drift.between(ref, got)
    return d.top1_agreement, d.cosine_similarity


def dq_fed_inputs(proto: onnx.ModelProto) -> dict[str, int]:
    """For each node name, how many of its inputs come out of a DequantizeLinear."""
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: sum(i in dq_out for i in n.input) for n in proto.graph.node}
