"""ONNX Runtime on the CPU: runs the reference ONNX itself, and a static QDQ INT8 ONNX (U8S8, per-channel)."""
from __future__ import annotations

from pathlib import Path

from export.layout import ORT_INT8, REFERENCE_ONNX
from export.manifest import Artifact
from partialnet.errors import DeployError
from runtimes.base import Runner
from runtimes.cpu import usable_cores

from .base import BuildContext, Int8Inputs, RunnerOptions, TritonModel, import_status


class OnnxRuntime:
    name = "onnxruntime"
    makes_artifacts = True
    float_precisions = ("fp32",)
    runs_reference_onnx = True
    builds_offline = False

    def status(self) -> str | None:
        return import_status("onnxruntime", "onnxruntime")

    def build(self, ctx: BuildContext, precision: str) -> Artifact:
        """The reference ONNX is this backend's FP32 artifact: the export wrote and recorded it already."""
        return next(a for a in ctx.manifest.artifacts if a.path == REFERENCE_ONNX)

    def build_int8(self, ctx: BuildContext, q: Int8Inputs) -> list[tuple[Artifact, dict]]:
        from calibration.ort_int8 import quantize_ort

        info = quantize_ort(ctx.onnx, ctx.folder / ORT_INT8, q.calib, policy=q.policy, session=q.session,
                            metadata=q.metadata, force=ctx.force, log=ctx.console)
        art = ctx.artifact(ORT_INT8, self.name, "int8", scheme="qdq", role="INT8 for onnxruntime on CPU (QDQ, U8S8)",
                           **q.row, quantize_linear=info.get("quantize_linear"),
                           dequantize_linear=info.get("dequantize_linear"))
        return [(art, info)]

    def prepare_offline(self, ctx: BuildContext, precisions: list[str]) -> None:
        return None

    def triton_model(self, art: Artifact) -> TritonModel | None:
        return TritonModel({"model.onnx": art.path}, platform="onnxruntime_onnx")

    def open(self, path: Path, precision: str, options: RunnerOptions) -> Runner:
        from runtimes.ort import OrtRunner

        if precision not in ("fp32", "fp16", "int8"):
            raise DeployError(f"onnxruntime runs fp32, fp16 and int8 ONNX files, not {precision}.")
        return OrtRunner(path, precision=precision, threads=options.threads)

    def open_streams(self, path: Path, precision: str, options: RunnerOptions, streams: int | None):
        """Concurrent runs on one session: `streams` caller threads (default: one per usable core), the intra-op
        threads divided among them."""
        from runtimes.ort import OrtRunner
        from runtimes.throughput import ThreadedStreams

        cores = options.threads or usable_cores()
        streams = streams or cores
        runner = OrtRunner(path, precision=precision, threads=max(1, cores // streams))
        return ThreadedStreams([runner.run] * streams, {**runner.options, "threads": cores}, runner.close)
