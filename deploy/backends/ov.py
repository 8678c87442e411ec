"""OpenVINO on the CPU: an FP32 IR (also compiled as bf16 where the CPU has it) and an NNCF INT8 IR."""
from __future__ import annotations

from pathlib import Path

from export.layout import OV_FP32, OV_INT8, ir_weights
from export.manifest import Artifact
from partialnet.files import file_sha256
from runtimes.base import Runner

from .base import BuildContext, Int8Inputs, RunnerOptions, TritonModel, import_status


class OpenVINO:
    name = "openvino"
    makes_artifacts = True
    float_precisions = ("fp32", "bf16")
    runs_reference_onnx = False
    builds_offline = False

    def status(self) -> str | None:
        return import_status("openvino", "OpenVINO")

    def build(self, ctx: BuildContext, precision: str) -> Artifact:
        from runtimes.ov import convert_to_ir, require_inference_precision

        require_inference_precision(precision)
        xml = ctx.folder / OV_FP32
        if not xml.exists():
            convert_to_ir(ctx.onnx, xml)
        # bf16 is the same IR compiled with another inference-precision hint: its own row, one set of files.
        weights = ir_weights(OV_FP32)
        return ctx.artifact(OV_FP32, self.name, precision, weights=weights,
                            weights_sha256=file_sha256(ctx.folder / weights),
                            inference_precision="f32" if precision == "fp32" else precision)

    def build_int8(self, ctx: BuildContext, q: Int8Inputs) -> list[tuple[Artifact, dict]]:
        from calibration.ov_int8 import OvQuantization, quantize_ov

        xml = ctx.folder / OV_FP32
        source = xml if xml.is_file() else ctx.onnx
        settings = OvQuantization(policy=q.policy, val=q.val if q.max_accuracy_drop is not None else None,
                                  max_drop=q.max_accuracy_drop, model_type=q.ov_model_type,  # type: ignore[arg-type]
                                  int8_cpu=q.int8_cpu)  # type: ignore[arg-type]
        info = quantize_ov(source, ctx.onnx, ctx.folder / OV_INT8, q.calib, settings, metadata=q.metadata,
                           force=ctx.force, console=ctx.console)
        weights = ir_weights(OV_INT8)
        row = {k: v for k, v in q.row.items()}
        row["float_parts"] = list(info["policy"]["float_parts"])  # the shared policy plus OpenVINO's speed parts
        art = ctx.artifact(OV_INT8, self.name, "int8", scheme="nncf", weights=weights,
                           weights_sha256=file_sha256(ctx.folder / weights), inference_precision="f32",
                           role="INT8 for OpenVINO (NNCF FakeQuantize)", nncf_mode=info["mode"],
                           fake_quantize=info["fake_quantize"], int8_cpu=info["int8_cpu"],
                           weights_exact_on=info["weights"],
                           head_weights="int8" if info["head_weights"] != "float" else "float", **row)
        if info["ignored_ops_reading_quantized_input"]:
            ctx.console(f"note: {len(info['ignored_ops_reading_quantized_input'])} float op(s) read a tensor NNCF "
                        f"quantized for another consumer")
        return [(art, info)]

    def prepare_offline(self, ctx: BuildContext, precisions: list[str]) -> None:
        return None

    def triton_model(self, art: Artifact) -> TritonModel | None:
        # Triton's OpenVINO backend takes HINT_BF16 (YES) and no f32 hint: fp32 and int8 rows run with the CPU
        # plugin's default precision, which is f32 except on CPUs with AMX, where OpenVINO defaults to bf16.
        params = {"PERFORMANCE_HINT": "LATENCY"}
        if art.precision == "bf16":
            params["HINT_BF16"] = "YES"
        files = {"model.xml": art.path}
        if "weights" in art.extra:
            files["model.bin"] = art.extra["weights"]
        return TritonModel(files, backend="openvino", default_model_filename="model.xml", parameters=params)

    def open(self, path: Path, precision: str, options: RunnerOptions) -> Runner:
        from runtimes.ov import OpenVINORunner

        # OpenVINO's compile cache beside the IR: the second run of an artifact skips compilation.
        return OpenVINORunner(path, precision=precision, threads=options.threads, cache_dir=Path(path).parent / "cache")

    def open_streams(self, path: Path, precision: str, options: RunnerOptions, streams: int | None):
        """The THROUGHPUT hint and an AsyncInferQueue, streams and requests as OpenVINO chooses (or `streams`)."""
        from runtimes.ov import OpenVINOStreams

        return OpenVINOStreams(path, precision=precision, threads=options.threads, streams=streams,
                               cache_dir=Path(path).parent / "cache")
