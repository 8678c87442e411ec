"""TensorRT on an NVIDIA GPU: engines built here when a GPU and TensorRT are present, and always the files the
target GPU needs to build them itself (the trtexec scripts, and the symmetric Q/DQ ONNX for INT8)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from export.layout import REFERENCE_ONNX, TRT_ENTROPY_CACHE, TRT_QDQ, TRT_TIMING_CACHE, trt_plan, trt_script
from export.manifest import Artifact
from partialnet.errors import DeployError
from runtimes.base import Runner

from .base import BuildContext, Int8Inputs, RunnerOptions, TritonModel

BATCH = (1, 1, 32)  # min, opt, max of the optimization profile


class TensorRT:
    name = "tensorrt"
    makes_artifacts = True
    float_precisions = ("fp32", "fp16")
    runs_reference_onnx = False
    builds_offline = True

    def status(self) -> str | None:
        from runtimes.trt import tensorrt_status

        return tensorrt_status()

    def _spec(self, ctx: BuildContext, precision: str) -> Any:
        from runtimes.trt import EngineSpec

        return EngineSpec(precision=precision, input_size=ctx.manifest.input_size, min_batch=BATCH[0],  # type: ignore[arg-type]
                          opt_batch=BATCH[1], max_batch=BATCH[2], timing_cache=ctx.folder / TRT_TIMING_CACHE)

    def build(self, ctx: BuildContext, precision: str) -> Artifact:
        from runtimes.trt import build_engine

        rel = trt_plan(precision)
        info = build_engine(ctx.onnx, ctx.folder / rel, self._spec(ctx, precision))
        self.prepare_offline(ctx, [precision])
        return ctx.artifact(rel, self.name, precision, **info)

    def prepare_offline(self, ctx: BuildContext, precisions: list[str]) -> None:
        """tensorrt/build.sh (and build.fp16.sh): the trtexec command that builds the engine on the target GPU."""
        from runtimes.trt import write_build_script

        for precision in [p for p in precisions if p in self.float_precisions]:
            dest = ctx.folder / trt_script(precision)
            if not dest.exists():
                write_build_script(dest, f"../{REFERENCE_ONNX}", Path(trt_plan(precision)).name,
                                   self._spec(ctx, precision))

    def build_int8(self, ctx: BuildContext, q: Int8Inputs) -> list[tuple[Artifact, dict]]:
        """The symmetric Q/DQ ONNX always (it needs no GPU, and onnxruntime runs it here), its trtexec script, and
        the engines where TensorRT can run."""
        from calibration.qdq import build_qdq
        from runtimes.trt import write_build_script

        info = build_qdq(ctx.onnx, ctx.folder / TRT_QDQ, q.calib, policy=q.policy, session=q.session,
                         metadata=q.metadata, force=ctx.force, log=ctx.console)
        qdq = ctx.artifact(TRT_QDQ, "onnxruntime", "int8", scheme="qdq-symmetric", target=self.name,
                           role="explicit Q/DQ ONNX (symmetric int8): the TensorRT int8 engine's source; checked here "
                                "with onnxruntime CPU", **q.row, quantize_linear=info.get("quantize_linear"),
                           dequantize_linear=info.get("dequantize_linear"))
        built: list[tuple[Artifact, dict]] = [(qdq, info)]
        script = trt_script("int8")
        write_build_script(ctx.folder / script, Path(TRT_QDQ).name, Path(trt_plan("int8")).name,
                           self._spec(ctx, "int8"), force=ctx.force)
        reason = self.status()
        if reason is not None:
            ctx.manifest.skip(self.name, "int8", f"{reason} The Q/DQ ONNX and {script} are ready to build it on the GPU.")
            ctx.console(f"skipped tensorrt int8 engine: {reason}")
            return built
        built += self._engines(ctx, q)
        return built

    def _engines(self, ctx: BuildContext, q: Int8Inputs) -> list[tuple[Artifact, dict]]:
        """The strongly typed engine from the Q/DQ ONNX; where TensorRT still has the calibrator API (10.x), also
        its entropy-calibrated implicit-INT8 engine. A failed engine is skipped; the Q/DQ ONNX stands."""
        from calibration.trt_calibrator import entropy_calibrator
        from runtimes.trt import build_engine, require_tensorrt

        out: list[tuple[Artifact, dict]] = []
        attempts: list[tuple[str | None, Path, Any]] = [(None, ctx.folder / TRT_QDQ, None)]
        if hasattr(require_tensorrt(), "IInt8EntropyCalibrator2"):
            attempts.append(("entropy", ctx.onnx, lambda: entropy_calibrator(
                ctx.onnx, q.calib, ctx.folder / TRT_ENTROPY_CACHE, ctx.manifest.preprocess)))
        for scheme, source, calibrator in attempts:
            rel = trt_plan("int8", scheme)
            try:
                spec = self._spec(ctx, "int8-entropy" if scheme else "int8")
                info = build_engine(source, ctx.folder / rel, spec, force=ctx.force,
                                    calibrator=calibrator() if calibrator else None)
            except DeployError as e:
                (ctx.folder / rel).unlink(missing_ok=True)
                ctx.manifest.skip(self.name, "int8", str(e))
                ctx.console(f"skipped tensorrt int8{'+' + scheme if scheme else ''} engine: {e}")
                continue
            extra = {"calibration_cache": TRT_ENTROPY_CACHE} if scheme else {"source": TRT_QDQ}
            art = ctx.artifact(rel, self.name, "int8", scheme=scheme or "qdq-symmetric", **extra, **info)
            out.append((art, info))
        return out

    def triton_model(self, art: Artifact) -> TritonModel | None:
        if not art.path.endswith(".plan"):
            return None
        return TritonModel({"model.plan": art.path}, platform="tensorrt_plan", kind="KIND_GPU", max_batch=BATCH[2])

    def open(self, path: Path, precision: str, options: RunnerOptions) -> Runner:
        from runtimes.trt import TensorRTRunner

        # The GPU runs it: CPU thread counts do not apply.
        return TensorRTRunner(path, precision=precision)  # type: ignore[arg-type]

    def open_streams(self, path: Path, precision: str, options: RunnerOptions, streams: int | None):
        """One execution context runs one request at a time: batch for throughput (streams is 1)."""
        from runtimes.throughput import ThreadedStreams

        runner = self.open(path, precision, options)
        return ThreadedStreams([runner.run], dict(runner.options), runner.close)
