"""INT8 artifacts for an export folder: one calibration, one exclusion policy, every backend.

`build_int8_artifacts` calibrates once on the given images (activation ranges cached under a key of model bytes,
images and preprocessing), optionally runs the sensitivity pass to keep the worst blocks in float until a requested
top-1 agreement or accuracy drop holds, then builds per backend:

| backend     | file                                    | manifest row (backend, precision)     |
|-------------|-----------------------------------------|---------------------------------------|
| onnxruntime | model.int8.onnx (QDQ, U8S8, CPU)        | onnxruntime, int8                     |
| openvino    | openvino/model.int8.xml + .bin (NNCF)   | openvino, int8                        |
| tensorrt    | tensorrt/model.qdq.onnx (symmetric Q/DQ)| onnxruntime, int8-qdq (role: TensorRT source, checked here on the CPU) |
| tensorrt    | tensorrt/model.int8.plan, where usable  | tensorrt, int8                        |

The Q/DQ ONNX is always built, because it needs no GPU; its row names onnxruntime as the backend because that is
what runs (and checks) it here, and `int8-qdq` so that it never shadows the CPU artifact's `int8` row. Beside it,
tensorrt/build.int8.sh rebuilds the engine with trtexec on the target GPU.

Each artifact's logits are compared with the FP32 reference on the calibration images (and on the validation
images, with top-1 accuracy, when they are labelled). Nothing here decides an exit code; the caller gates.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calibration.ort_int8 import METHODS, QuantSession, quantize_ort
from calibration.ov_int8 import resolve_int8_cpu
from calibration.policy import DEFAULT_POLICY, FloatPolicy
from calibration.sensitivity import Target, sensitivity_pass
from calibration.sources import ImageSet
from export.manifest import Artifact, Manifest, metadata_props
from partialnet.errors import DeployError, UsageError, WriteError
from runtimes.base import INPUT_NAME, OUTPUT_NAME

from .drift import TOLERANCES, Drift

INT8_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
ORT_INT8 = "model.int8.onnx"
OV_INT8 = "openvino/model.int8.xml"
TRT_QDQ = "tensorrt/model.qdq.onnx"
TRT_PLAN = "tensorrt/model.int8.plan"
TRT_SCRIPT = "tensorrt/build.int8.sh"
TRT_ENTROPY_PLAN = "tensorrt/model.int8-entropy.plan"
TRT_ENTROPY_CACHE = "tensorrt/calibration.cache"
QDQ_PRECISION = "int8-qdq"


def _check_request(folder: Path, backends: list[str], calib: ImageSet, val: ImageSet | None, method: str,
                   target_agreement: float | None, max_accuracy_drop: float | None, int8_cpu: str) -> None:
    unknown = [b for b in backends if b not in INT8_BACKENDS]
    if unknown:
        raise UsageError(f"INT8 backend(s) {', '.join(unknown)} unknown; choose from {', '.join(INT8_BACKENDS)}.")
    if not backends:
        raise UsageError("no INT8 backend requested; choose from " + ", ".join(INT8_BACKENDS) + ".")
    resolve_int8_cpu(int8_cpu)  # before the slow calibration
    if method not in METHODS:
        raise UsageError(f"calibration method {method!r} is not one of {', '.join(METHODS)}.")
    if not (folder / "model.onnx").is_file():
        raise UsageError(f"{folder} has no model.onnx; INT8 is built from the FP32 export, so export first.")
    if len(calib) == 0:
        raise UsageError(f"the calibration set ({calib.source}) is empty; give at least one image.")
    if max_accuracy_drop is not None and (val is None or val.labels is None):
        raise UsageError("--max-accuracy-drop needs labelled validation images (class subfolders or a labelled .txt list).")
    if target_agreement is not None or max_accuracy_drop is not None:
        Target(target_agreement, max_accuracy_drop)  # range checks, one wording


def _logits(runner: Any, x: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([runner.run({INPUT_NAME: x[i : i + batch]})[OUTPUT_NAME] for i in range(0, len(x), batch)])


def _evaluate(backend: str, path: Path, precision: str, runner_precision: str, calib: ImageSet, ref_calib: np.ndarray,
              val: ImageSet | None, ref_val: np.ndarray | None, threads: int | None) -> dict[str, Any]:
    """Drift of one artifact from the FP32 reference (and top-1 when labelled), judged by the int8 tolerance."""
    from runtimes.factory import open_runner

    runner = open_runner(backend, path, precision=runner_precision, threads=threads)  # type: ignore[arg-type]
    try:
        out: dict[str, Any] = {}
        sets = [("calibration", calib, ref_calib)] + ([("validation", val, ref_val)] if val is not None else [])
        for label, images, ref in sets:
            got = _logits(runner, images.images)
            drift = Drift.between(ref, got)
            entry: dict[str, Any] = {"drift": drift.to_dict(), "failures": TOLERANCES["int8"].failures(drift)}
            if images.labels is not None:
                entry["top1_fp32"] = float((ref.argmax(1) == images.labels).mean())
                entry["top1_int8"] = float((got.argmax(1) == images.labels).mean())
                entry["top1_drop"] = entry["top1_fp32"] - entry["top1_int8"]
            out[label] = entry
        out["tolerance"] = TOLERANCES["int8"].to_dict()
        out["precision"] = precision
        return out
    finally:
        runner.close()


def build_int8_artifacts(
    folder: Path,
    manifest: Manifest,
    backends: list[str],
    calib: ImageSet,
    val: ImageSet | None,
    fp32_logits_fn: Callable[[np.ndarray], np.ndarray],
    *,
    method: str = "minmax",
    target_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
    log: Callable[[str], None] = print,
    force: bool = False,
    cache_dir: Path | None = None,
    threads: int | None = None,
    ov_model_type: str = "cnn",
    int8_cpu: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Build the INT8 artifact of each backend into `folder`, append their manifest rows, return a report section.

    `fp32_logits_fn(images)` gives the FP32 (eager) logits the INT8 artifacts are judged against. With
    `target_agreement` and/or `max_accuracy_drop` (fractions; the drop needs labelled `val`) the sensitivity pass
    keeps the worst blocks in float for every backend. A backend that fails is recorded in `manifest.skipped`
    with its reason and the others are still built. `cache_dir` keeps calibration ranges across runs (keyed, a
    stale one is never read); by default they live only for this call. `int8_cpu` says which CPUs the OpenVINO
    INT8 weights must be exact on (calibration.ov_int8); ONNX Runtime's runner picks exact kernels by itself.
    """
    folder = Path(folder)
    _check_request(folder, backends, calib, val, method, target_agreement, max_accuracy_drop, int8_cpu)
    onnx_path = folder / "model.onnx"
    report: dict[str, Any] = {"backends": list(backends), "artifacts": {}, "skipped": []}
    ref_calib = fp32_logits_fn(calib.images)
    ref_val = fp32_logits_fn(val.images) if val is not None else None
    metadata = metadata_props(manifest, "int8")

    with tempfile.TemporaryDirectory(prefix="partialnet-int8-") as work:
        session = QuantSession(onnx_path, calib, method, manifest.preprocess, workdir=Path(work),
                               cache_dir=cache_dir, log=log)
        policy: FloatPolicy = DEFAULT_POLICY
        if target_agreement is not None or max_accuracy_drop is not None:
            target = Target(target_agreement, max_accuracy_drop)
            use_val = val is not None
            result = sensitivity_pass(
                session, ref_val if use_val else ref_calib, target,
                images=val.images if use_val else None, labels=val.labels if use_val else None,
                threads=threads, log=log,
            )
            report["sensitivity"] = result.to_dict()
            policy = result.policy(DEFAULT_POLICY)
            if not result.met:
                log(f"warning: the INT8 target was not met even with {len(result.kept_float)} units in float")
        session.ranges()
        report["calibration"] = session.calibration_info()
        report["pre_processing"] = session.pre_processing
        report["policy"] = policy.to_dict()
        if calib.skipped:
            report["calibration"]["skipped_examples"] = calib.skipped[:5]

        for backend in backends:
            rows_before = len(manifest.artifacts)
            try:
                if backend == "onnxruntime":
                    info = quantize_ort(onnx_path, folder / ORT_INT8, calib, policy=policy, session=session,
                                        metadata=metadata, force=force, log=log)
                    info["check"] = _evaluate("onnxruntime", folder / ORT_INT8, "int8", "int8", calib, ref_calib,
                                              val, ref_val, threads)
                    manifest.artifacts.append(Artifact.of(
                        folder, ORT_INT8, "onnxruntime", "int8", role="INT8 for onnxruntime on CPU (QDQ, U8S8)",
                        **_row(info, session, policy)))
                    report["artifacts"]["onnxruntime/int8"] = _slim(info)
                elif backend == "openvino":
                    report["artifacts"]["openvino/int8"] = _build_openvino(
                        folder, manifest, calib, val, policy, session, metadata, max_accuracy_drop, ov_model_type,
                        int8_cpu, ref_calib, ref_val, threads, force, log, progress)
                elif backend == "tensorrt":
                    report["artifacts"].update(_build_tensorrt(
                        folder, manifest, calib, val, policy, session, metadata, ref_calib, ref_val, threads, force, log))
            except WriteError:  # a full disk is not a reason to skip a backend: the export stops
                raise
            except DeployError as e:
                # Rows of this backend added before the failure go, with their files: no half-built backend.
                for art in manifest.artifacts[rows_before:]:
                    for rel in (art.path, art.extra.get("weights")):
                        if rel:
                            (folder / rel).unlink(missing_ok=True)
                del manifest.artifacts[rows_before:]
                manifest.skipped.append({"backend": backend, "precision": "int8", "reason": str(e)})
                report["skipped"].append({"backend": backend, "reason": str(e)})
                log(f"skipped {backend} int8: {e}")
    return report


def _row(info: dict[str, Any], session: QuantSession, policy: FloatPolicy) -> dict[str, Any]:
    """The manifest's per-artifact facts: short, the report has the details."""
    return {
        "calibration_method": session.method,
        "calibration_source": session.calib.source,
        "calibration_size": len(session.calib),
        "policy": policy.name,
        "float_parts": list(policy.parts),
        "float_units": list(policy.units),
        "quantize_linear": info.get("quantize_linear"),
        "dequantize_linear": info.get("dequantize_linear"),
    }


def _slim(info: dict[str, Any]) -> dict[str, Any]:
    """A report entry without the long node-name lists (their count stays)."""
    out = {k: v for k, v in info.items() if k not in ("excluded_node_names", "ignored_names", "policy", "calibration")}
    if "excluded_node_names" in info:
        out["excluded_nodes"] = len(info["excluded_node_names"])
    return out


def _build_openvino(folder: Path, manifest: Manifest, calib: ImageSet, val: ImageSet | None, policy: FloatPolicy,
                    session: QuantSession, metadata: dict[str, str], max_drop: float | None, model_type: str,
                    int8_cpu: str, ref_calib: np.ndarray, ref_val: np.ndarray | None, threads: int | None, force: bool,
                    log: Callable[[str], None], progress: bool) -> dict[str, Any]:
    from calibration.ov_int8 import quantize_ov

    xml = folder / "openvino" / "model.xml"
    source = xml if xml.is_file() else folder / "model.onnx"
    info = quantize_ov(source, folder / "model.onnx", folder / OV_INT8, calib, policy=policy,
                       val=val if max_drop is not None else None, max_drop=max_drop,
                       model_type=model_type, int8_cpu=int8_cpu, metadata=metadata, force=force,  # type: ignore[arg-type]
                       log=log, progress=progress)
    info["check"] = _evaluate("openvino", folder / OV_INT8, "int8", "int8", calib, ref_calib, val, ref_val, threads)
    bin_rel = OV_INT8[: -len(".xml")] + ".bin"
    row = {k: v for k, v in _row(info, session, policy).items() if k not in ("quantize_linear", "dequantize_linear")}
    row["float_parts"] = list(info["policy"]["float_parts"])  # the shared policy plus OpenVINO's speed parts
    manifest.artifacts.append(Artifact.of(
        folder, OV_INT8, "openvino", "int8", weights=bin_rel,
        weights_sha256=Artifact.of(folder, bin_rel, "openvino", "int8").sha256, inference_precision="f32",
        role="INT8 for OpenVINO (NNCF FakeQuantize)", nncf_mode=info["mode"], fake_quantize=info["fake_quantize"],
        int8_cpu=info["int8_cpu"], weights_exact_on=info["weights"], **row))
    if info["ignored_ops_reading_quantized_input"]:
        log(f"note: {len(info['ignored_ops_reading_quantized_input'])} float op(s) read a tensor NNCF quantized for "
            f"another consumer")
    return _slim(info)


def _build_tensorrt(folder: Path, manifest: Manifest, calib: ImageSet, val: ImageSet | None, policy: FloatPolicy,
                    session: QuantSession, metadata: dict[str, str], ref_calib: np.ndarray, ref_val: np.ndarray | None,
                    threads: int | None, force: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from calibration.qdq import build_qdq
    from runtimes.trt import build_engine, tensorrt_status, write_build_script

    from .backends import TRT_BATCH

    out: dict[str, Any] = {}
    info = build_qdq(folder / "model.onnx", folder / TRT_QDQ, calib, policy=policy, session=session,
                     metadata=metadata, force=force, log=log)
    # Runners take the file's arithmetic, not its role: a Q/DQ graph is an int8 graph to onnxruntime.
    info["check"] = _evaluate("onnxruntime", folder / TRT_QDQ, QDQ_PRECISION, "int8", calib, ref_calib, val, ref_val,
                              threads)
    manifest.artifacts.append(Artifact.of(
        folder, TRT_QDQ, "onnxruntime", QDQ_PRECISION, target_backend="tensorrt",
        role="explicit Q/DQ ONNX (symmetric int8): the TensorRT int8 engine's source; checked here with onnxruntime CPU",
        **_row(info, session, policy)))
    out[f"onnxruntime/{QDQ_PRECISION}"] = _slim(info)
    script = folder / TRT_SCRIPT
    write_build_script(script, Path(TRT_QDQ).name, Path(TRT_PLAN).name, "int8", manifest.input_size, *TRT_BATCH,
                       force=force)
    reason = tensorrt_status()
    if reason is not None:
        manifest.skipped.append({"backend": "tensorrt", "precision": "int8",
                                 "reason": f"{reason} The Q/DQ ONNX and {TRT_SCRIPT} are ready to build it on the GPU."})
        out["tensorrt/int8"] = {"built": False, "reason": reason, "build_script": TRT_SCRIPT}
        log(f"skipped tensorrt int8 engine: {reason}")
        return out
    try:
        built = build_engine(folder / TRT_QDQ, folder / TRT_PLAN, precision="int8", input_size=manifest.input_size,
                             min_batch=TRT_BATCH[0], opt_batch=TRT_BATCH[1], max_batch=TRT_BATCH[2],
                             timing_cache=folder / "tensorrt" / "timing.cache", force=force)
        check = _evaluate("tensorrt", folder / TRT_PLAN, "int8", "int8", calib, ref_calib, val, ref_val, None)
    except DeployError as e:  # the Q/DQ ONNX and its check stand; only the engine is missing
        (folder / TRT_PLAN).unlink(missing_ok=True)
        manifest.skipped.append({"backend": "tensorrt", "precision": "int8", "reason": str(e)})
        out["tensorrt/int8"] = {"built": False, "reason": str(e), "build_script": TRT_SCRIPT}
        log(f"skipped tensorrt int8 engine: {e}")
        return out
    manifest.artifacts.append(Artifact.of(folder, TRT_PLAN, "tensorrt", "int8", source=TRT_QDQ, **built))
    out["tensorrt/int8"] = {"built": True, **built, "check": check}
    out.update(_build_tensorrt_entropy(folder, manifest, calib, val, ref_calib, ref_val, force, log))
    return out


def _build_tensorrt_entropy(folder: Path, manifest: Manifest, calib: ImageSet, val: ImageSet | None,
                            ref_calib: np.ndarray, ref_val: np.ndarray | None, force: bool,
                            log: Callable[[str], None]) -> dict[str, Any]:
    """Where TensorRT still has the calibrator API (10.x), also offer its entropy-calibrated implicit-INT8 engine."""
    from calibration.trt_calibrator import entropy_calibrator
    from runtimes.trt import build_engine, require_tensorrt

    from .backends import TRT_BATCH

    if not hasattr(require_tensorrt(), "IInt8EntropyCalibrator2"):
        return {}
    try:
        calibrator = entropy_calibrator(folder / "model.onnx", calib, folder / TRT_ENTROPY_CACHE, manifest.preprocess)
        built = build_engine(folder / "model.onnx", folder / TRT_ENTROPY_PLAN, precision="int8-entropy",
                             input_size=manifest.input_size, min_batch=TRT_BATCH[0], opt_batch=TRT_BATCH[1],
                             max_batch=TRT_BATCH[2], timing_cache=folder / "tensorrt" / "timing.cache", force=force,
                             calibrator=calibrator)
        check = _evaluate("tensorrt", folder / TRT_ENTROPY_PLAN, "int8-entropy", "int8-entropy", calib, ref_calib,
                          val, ref_val, None)
    except DeployError as e:
        (folder / TRT_ENTROPY_PLAN).unlink(missing_ok=True)
        manifest.skipped.append({"backend": "tensorrt", "precision": "int8-entropy", "reason": str(e)})
        log(f"skipped tensorrt int8-entropy engine: {e}")
        return {"tensorrt/int8-entropy": {"built": False, "reason": str(e)}}
    manifest.artifacts.append(Artifact.of(folder, TRT_ENTROPY_PLAN, "tensorrt", "int8-entropy",
                                          calibration_cache=TRT_ENTROPY_CACHE, **built))
    return {"tensorrt/int8-entropy": {"built": True, **built, "check": check}}
