"""Every file an export folder holds, named in one place (paths relative to the folder)."""
from __future__ import annotations

MANIFEST = "manifest.json"
REFERENCE_ONNX = "model.onnx"  # reparameterized, simplified FP32 ONNX: the source of every other artifact
REPORT = ("report.json", "report.md")
VALIDATION = ("validation.json", "validation.md")
VALIDATION_STATE = ".validation-state"  # a validation in progress: its state file and logits (deploy validate --resume)
BENCH = ("bench.json", "bench.md", "bench.png")

ORT_INT8 = "model.int8.onnx"

OV_FP32 = "openvino/model.xml"
OV_INT8 = "openvino/model.int8.xml"
OV_CACHE = "openvino/cache"

TRT_QDQ = "tensorrt/model.qdq.onnx"
TRT_TIMING_CACHE = "tensorrt/timing.cache"
TRT_ENTROPY_CACHE = "tensorrt/calibration.cache"


def ir_weights(xml: str) -> str:
    """The .bin beside an OpenVINO .xml."""
    return xml[: -len(".xml")] + ".bin" if xml.endswith(".xml") else xml + ".bin"


def trt_plan(precision: str, scheme: str | None = None) -> str:
    return f"tensorrt/model.{precision}{'-' + scheme if scheme else ''}.plan"


def trt_script(precision: str) -> str:
    """The trtexec script beside the engine it builds; fp32's keeps the first name it had."""
    return "tensorrt/build.sh" if precision == "fp32" else f"tensorrt/build.{precision}.sh"
