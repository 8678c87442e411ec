"""deploy/int8.py: every backend's INT8 artifacts built into an export folder, checked, in the manifest.

The model is PartialNet-T0 with randomized BatchNorm statistics, affines and iRPE tables, 10 classes, exported at
64 px (tests/calibration/conftest.py).
"""
from __future__ import annotations


import pytest
import torch

from partialnet.errors import UsageError
from int8_fixtures import SIZE, CALIB, MIN_AGREEMENT, MIN_COSINE



# --------------------------------------------------------------------------------------------------------
# the orchestration, on a real export folder
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_int8_artifacts_fills_folder_and_manifest(model, tmp_path, calib):
    from deploy import backends
    from deploy.backends import BuildContext
    from deploy.cli import main
    from deploy.int8 import Int8Request, build_int8_artifacts
    from deploy.reference import eager_from_manifest
    from export.manifest import Manifest
    from partialnet.console import SILENT
    from runtimes.trt import tensorrt_status

    checkpoint = tmp_path / "randomized.pth"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "export"
    assert main(["export", "partialnet_t0", "--checkpoint", str(checkpoint), "--input-size", str(SIZE),
                 "--output", str(out), "-q", "--no-validate", "--no-bench"]) == 0
    manifest = Manifest.load(out)
    eager = eager_from_manifest(manifest)

    def fp32(x):
        with torch.inference_mode():
            return eager(torch.from_numpy(x)).numpy()

    ctx = BuildContext(out, manifest, SILENT)
    targets = [backends.get(n) for n in ("onnxruntime", "openvino", "tensorrt")]
    report = build_int8_artifacts(ctx, targets, calib, None, fp32)
    rows = {a.key: a for a in manifest.artifacts}
    assert rows["onnxruntime/int8"].path == "model.int8.onnx" and rows["onnxruntime/int8"].scheme == "qdq"
    assert rows["openvino/int8"].path == "openvino/model.int8.xml" and rows["openvino/int8"].scheme == "nncf"
    assert rows["openvino/int8"].extra["weights"] == "openvino/model.int8.bin"
    qdq = rows["onnxruntime/int8@tensorrt"]
    assert qdq.path == "tensorrt/model.qdq.onnx" and qdq.precision == "int8" and qdq.scheme == "qdq-symmetric"
    assert qdq.target == "tensorrt"
    assert (out / "tensorrt" / "build.int8.sh").is_file()
    assert "--stronglyTyped" in (out / "tensorrt" / "build.int8.sh").read_text()
    if tensorrt_status() is not None:
        assert "tensorrt/int8" not in rows
        assert any(s["backend"] == "tensorrt" and s["precision"] == "int8" for s in manifest.skipped)
    for key in ("onnxruntime/int8", "openvino/int8", "onnxruntime/int8@tensorrt"):
        drift = report["artifacts"][key]["check"]["calibration"]["drift"]
        assert drift["top1_agreement"] >= MIN_AGREEMENT and drift["cosine_similarity"] >= MIN_COSINE, key
    assert report["policy"]["name"] == "default" and report["calibration"]["size"] == CALIB
    with pytest.raises(UsageError, match="needs labelled validation images"):
        build_int8_artifacts(ctx, targets[:1], calib, None, fp32, Int8Request(max_accuracy_drop=0.01))
    with pytest.raises(UsageError, match=r"no INT8 backend requested"):
        build_int8_artifacts(ctx, [], calib, None, fp32)
