"""INT8 on real digits (slow): at most one point of top-1 lost on both CPU backends.

The model is PartialNet-T0 with randomized BatchNorm statistics, affines and iRPE tables, 10 classes, exported at
64 px (tests/calibration/conftest.py).
"""
from __future__ import annotations


import numpy as np
import pytest

from calibration.ort_int8 import quantize_ort
from partialnet.variants import Preprocess
from int8_fixtures import ort_logits



# --------------------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_loses_at_most_one_point_on_real_digits(tmp_path):
    from calibration.ov_int8 import OvQuantization, quantize_ov
    from calibration.sources import load_images
    from deploy.cli import main
    from realdata import digits_fixture
    from runtimes.ov import OpenVINORunner

    fx = digits_fixture()
    out = tmp_path / "digits"
    assert main(["export", fx.variant, "--checkpoint", str(fx.checkpoint), "--input-size", str(fx.input_size),
                 "--output", str(out), "-q", "--no-validate", "--no-bench"]) == 0
    pp = Preprocess(input_size=fx.input_size)
    calib = load_images(fx.train_dir, pp, limit=300, seed=0)
    test = load_images(fx.test_dir, pp)
    quantize_ort(out / "model.onnx", out / "model.int8.onnx", calib, preprocess=pp.to_dict())
    quantize_ov(out / "openvino" / "model.xml", out / "model.onnx", out / "openvino" / "model.int8.xml", calib)
    # accuracy control validates on other training images (the test set stays unseen) with a one-point budget
    val = load_images(fx.train_dir, pp, limit=200, seed=1)
    info = quantize_ov(out / "openvino" / "model.xml", out / "model.onnx", out / "openvino" / "model.ac.xml", calib,
                       OvQuantization(val=val, max_drop=0.01))
    assert info["mode"] == "quantize_with_accuracy_control" and info["fake_quantize"] > 0

    def top1(logits: np.ndarray) -> float:
        return float((logits.argmax(1) == test.labels).mean())

    results = {"onnxruntime": top1(ort_logits(out / "model.int8.onnx", test.images))}
    for name in ("model.int8.xml", "model.ac.xml"):
        runner = OpenVINORunner(out / "openvino" / name, precision="int8")
        results[f"openvino {name}"] = top1(runner.run({"input": test.images})["logits"])
    for what, acc in results.items():
        assert acc >= fx.eager_top1 - 0.01, f"{what} INT8 top-1 {acc:.4f} vs eager {fx.eager_top1:.4f}"
