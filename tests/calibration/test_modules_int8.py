"""INT8 rows of the attention-module conformance suite (benchmarks/MODULES.md has them all): DANet, whose
activation x activation MatMuls drift most in INT8, with the default float policy and with `act_matmul`."""
from __future__ import annotations

import numpy as np
import pytest

from calibration.ort_int8 import QuantSession, quantize_ort
from calibration.policy import DEFAULT_POLICY, FloatPolicy
from calibration.sources import default_images
from export.fold import fold_model
from export.to_onnx import export_onnx
from helpers import randomize_
from partialnet.attention import FACTORIES
from partialnet.variants import IMAGENET
from runtimes.compare import Drift
from runtimes.ort import OrtRunner

SIZE = 64


def logits(path, x, precision="fp32") -> np.ndarray:
    runner = OrtRunner(path, precision=precision)
    try:
        return runner.run({"input": x})["logits"]
    finally:
        runner.close()


@pytest.mark.slow
def test_danet_int8_keeps_its_attention_matmuls_in_float(tmp_path):
    model = randomize_(FACTORIES["danet"](), 2).eval()
    folded, _ = fold_model(model, SIZE)
    export_onnx(folded, tmp_path / "model.onnx", SIZE)
    pp = IMAGENET.at(SIZE)
    calib, held = default_images(32, pp, seed=0), default_images(32, pp, seed=1)
    ref = logits(tmp_path / "model.onnx", held.images)
    cosine = {}
    with QuantSession(tmp_path / "model.onnx", calib, "minmax", pp.to_dict(), workdir=tmp_path / "work") as session:
        without = FloatPolicy(parts=tuple(p for p in DEFAULT_POLICY.parts if p != "act_matmul"))
        assert "act_matmul" in DEFAULT_POLICY.parts
        for name, policy in (("without", without), ("default", DEFAULT_POLICY)):
            quantize_ort(tmp_path / "model.onnx", tmp_path / f"{name}.onnx", calib, policy=policy, session=session,
                         force=True)
            cosine[name] = Drift.between(ref, logits(tmp_path / f"{name}.onnx", held.images, "int8")).cosine_similarity
    assert cosine["default"] > 0.9999
    assert 1 - cosine["default"] < (1 - cosine["without"]) / 2, cosine  # act_matmul at least halves the cosine gap
