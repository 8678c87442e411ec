"""`deploy export`: checkpoint -> reparameterized model -> ONNX (+ onnxsim) -> checked artifacts in one folder.

Everything is written into a staging folder beside the destination and renamed into place at the end, so an
interrupted export never leaves a folder that looks complete. An existing destination is kept unless `force`.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from calibration.sources import ImageSet, default_images, load_images
from export.manifest import Artifact, Manifest, metadata_props
from export.reparam import reparameterize_model_with_summary
from export.to_onnx import DEFAULT_OPSET, GraphStats, check_opset, export_onnx, save_onnx, set_metadata
from partialnet import build_model
from partialnet.files import atomic_write_json, atomic_write_text
from partialnet.profile import count_macs, count_params
from partialnet.resources import require_memory
from runtimes.base import INPUT_NAME, OUTPUT_NAME

from .backends import build_backends, parse_backends
from .drift import TOLERANCES, Drift
from .precisions import parse_precisions
from .report import Report
from .staging import ExportStaging as _Staging

ONNX_FP32 = "model.onnx"
CHECK_SAMPLES = 8
CALIB_SIZE = 512
DEFAULT_CALIB_IMAGES = 128  # the embedded default set: all of it is used when --calib-size asks for more
VALIDATE_SAMPLES = 64
VALIDATE_BATCH = 16  # ValidateRequest's default batch
BENCH_WARMUP_S, BENCH_DURATION_S = 0.5, 2.0
SIMPLIFY_RTOL = 1e-5


@dataclass
class ExportRequest:
    variant: str
    checkpoint: str | None = None
    input_size: int | None = None
    opset: int = DEFAULT_OPSET
    output: str | None = None
    force: bool = False
    reparam: bool = True
    simplify: bool = True
    exporter: str = "torchscript"
    spatial_attn: bool | None = None
    allow_pickle: bool = False
    val_data: str | None = None
    check: bool = True
    check_samples: int = CHECK_SAMPLES
    threads: int | None = None
    backends: str | None = None  # comma-separated; None = every backend usable here
    precisions: tuple[str, ...] = ("fp32",)
    int8: bool = False
    calib_data: str | None = None
    calib_size: int = CALIB_SIZE
    calib_method: str = "minmax"
    int8_cpu: str = "auto"  # which CPUs the OpenVINO INT8 weights are exact on: auto, any, vnni
    target_agreement: float | None = None
    max_accuracy_drop: float | None = None  # fraction of top-1
    validate: bool = True
    bench: bool = True
    quiet: bool = False

    def __post_init__(self) -> None:
        self.precisions = parse_precisions(self.precisions)  # fp32 always, whatever a caller passes


@dataclass
class ExportResult:
    folder: Path
    report: Report
    exit_code: int
    timings: dict[str, float] = field(default_factory=dict)


def default_output(variant: str, input_size: int, default_size: int) -> Path:
    return Path("exports") / (variant if input_size == default_size else f"{variant}_{input_size}")


def ort_logits(path: Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Logits from ONNX Runtime on CPU, all graph optimizations on (what a user's session does)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def eager_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).float().numpy()


def fp32_noise_floor(model: torch.nn.Module, x: np.ndarray, fp32_logits: np.ndarray) -> float:
    """Max |logit| difference between the eager model in fp32 and in float64 on x: its own rounding error."""
    import copy

    m64 = copy.deepcopy(model).double()
    with torch.inference_mode():
        ref64 = m64(torch.from_numpy(x).double()).numpy()
    return float(np.abs(fp32_logits.astype(np.float64) - ref64).max())


def check_images(req: ExportRequest, pp, log) -> ImageSet:
    """The fixed batch the post-export check runs: the user's images, or the embedded deterministic set."""
    if req.val_data:
        return load_images(req.val_data, pp, limit=req.check_samples, seed=0)
    return default_images(req.check_samples, pp, seed=0)


def _simplify(proto: onnx.ModelProto, raw_path: Path, dest: Path, x: np.ndarray, log) -> tuple[onnx.ModelProto, dict]:
    """onnxsim, then re-validate on real inputs; on any failure keep the unsimplified graph and say why."""
    import onnxsim

    info: dict[str, Any] = {"applied": False}
    try:
        simplified, ok = onnxsim.simplify(proto, initializers_as_constants=False)
    except Exception as e:  # onnxsim raises many types; the unsimplified graph is still valid
        info["reason"] = f"onnxsim failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"note: {info['reason']}; keeping the unsimplified graph")
        return proto, info
    if not ok:
        info["reason"] = "onnxsim's own check failed"
        log("note: onnxsim's check failed; keeping the unsimplified graph")
        return proto, info
    save_onnx(simplified, dest, force=True)
    before = ort_logits(raw_path, x)
    after = ort_logits(dest, x)
    err = float(np.abs(before - after).max())
    limit = SIMPLIFY_RTOL * max(1.0, float(np.abs(before).max()))
    info["max_abs_change"] = err
    if err > limit:
        info["reason"] = f"simplified graph changed the logits by {err:.3g} (> {limit:.3g})"
        log(f"note: {info['reason']}; keeping the unsimplified graph")
        return proto, info
    info["applied"] = True
    return simplified, info


def calibration_images(req: ExportRequest, pp, log) -> ImageSet:
    """--calib-data (seeded, stratified sample of --calib-size), or the embedded default set, said plainly."""
    if req.calib_data:
        calib = load_images(req.calib_data, pp, limit=req.calib_size, seed=0)
        if calib.skipped:
            log(f"note: skipped {len(calib.skipped)} unreadable calibration image(s), e.g. {calib.skipped[0]}")
        return calib
    calib = default_images(min(req.calib_size, DEFAULT_CALIB_IMAGES), pp, seed=0)
    log(f"warning: INT8 is calibrated on the {calib.source}, NOT on your data; pass --calib-data DIR "
        f"(a few hundred of your own images) for a calibration you can trust")
    return calib


def _int8(req, folder: Path, manifest: Manifest, backends, unavailable, original, pp, report: Report, log) -> None:
    from .int8 import build_int8_artifacts

    calib = calibration_images(req, pp, log)
    val = load_images(req.val_data, pp, seed=0) if req.val_data else None
    # The Q/DQ ONNX for TensorRT needs no GPU: build it whenever TensorRT was asked for, usable here or not.
    targets = [b for b in backends if b != "tensorrt"] + (["tensorrt"] if "tensorrt" in backends or "tensorrt" in unavailable else [])
    section = build_int8_artifacts(
        folder, manifest, targets, calib, val, lambda x: eager_logits(original, x),
        method=req.calib_method, target_agreement=req.target_agreement, max_accuracy_drop=req.max_accuracy_drop,
        log=log, threads=req.threads, int8_cpu=req.int8_cpu, progress=not req.quiet,
    )
    section["calibrated_on_user_data"] = calib.user_data
    if not calib.user_data:
        section["warning"] = f"calibrated on the {calib.source}, not on the user's data"
    report.section("int8", section)


def _validate(req, folder: Path, report: Report, log, shown_as: str) -> None:
    """Every artifact against eager on the validation data (or the default set): the gates of `deploy validate`."""
    from .validate import ValidateRequest, run_validation

    drop = req.max_accuracy_drop * 100 if req.max_accuracy_drop is not None else None
    # Without --val-data, a sample of the calibration data is still the user's own domain; the embedded photos
    # would be out of distribution for, say, a digits model. It is not held out: the report says so.
    data = req.val_data or (req.calib_data if req.int8 else None)
    held_out = bool(req.val_data)
    if data and not held_out:
        log("note: validating on a sample of --calib-data (not held out); pass --val-data for held-out images")
    val = run_validation(
        ValidateRequest(folder, data=data, samples=None if held_out else VALIDATE_SAMPLES, seed=0 if held_out else 1,
                        threads=req.threads, max_top1_drop=drop, allow_pickle=req.allow_pickle, shown_as=shown_as),
        log=log, show_progress=not req.quiet,
    )
    doc = val.document
    report.section("validation", {
        "data": doc["data"]["source"],
        "held_out": held_out,
        "artifacts": [{k: row.get(k) for k in ("backend", "precision", "top1", "top1_agreement",
                                               "max_abs_logit_error", "cosine_similarity", "passed")}
                      for row in doc["artifacts"]],
        "files": ["validation.json", "validation.md"],
    })
    for gate in doc["gates"]:
        report.gate(f"validate: {gate['name']}", gate["failures"])


def _bench(req, folder: Path, report: Report, log, shown_as: str) -> None:
    """A short interleaved latency run at batch 1 (the plot, and INT8 against FP32 on each backend)."""
    from .bench import BenchRequest, run_bench

    b = run_bench(BenchRequest(folder, batch_sizes=(1,), threads=req.threads, warmup_s=BENCH_WARMUP_S,
                               duration_s=BENCH_DURATION_S, shown_as=shown_as), log=log, show_progress=not req.quiet)
    rows = b.document["rows"]
    p50 = {(r["backend"], r["precision"]): r["p50_ms"] for r in rows}
    int8_vs_fp32 = {}
    for (backend, precision), ms in p50.items():
        if precision.startswith("int8") and (backend, "fp32") in p50:
            ratio = ms / p50[(backend, "fp32")]
            int8_vs_fp32[f"{backend}/{precision}"] = {
                "int8_p50_ms": ms, "fp32_p50_ms": p50[(backend, "fp32")], "int8_over_fp32": ratio,
                "faster": ratio < 1.0,
            }
            if ratio >= 1.0:
                note = (f"{backend} {precision} is not faster than fp32 here ({ms:.2f} vs {p50[(backend, 'fp32')]:.2f} "
                        f"ms p50): see bench.md; short export-time runs on a busy machine are noisy, rerun 'deploy bench'")
                int8_vs_fp32[f"{backend}/{precision}"]["note"] = note
                log(f"note: {note}")
    report.section("latency", {
        "rows": [{k: r[k] for k in ("backend", "precision", "batch_size", "p50_ms", "p90_ms", "speedup_vs_eager")}
                 for r in rows],
        "int8_vs_fp32": int8_vs_fp32,
        "settings": {"batch_size": 1, "threads": req.threads, "warmup_s": BENCH_WARMUP_S, "duration_s": BENCH_DURATION_S},
        "files": ["bench.json", "bench.md", "bench.png"],
    })


def _simplified_or_same(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim's result for statistics only (node counts of the training-form graph)."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(proto, initializers_as_constants=False)
    except Exception:  # statistics of the unsimplified graph are still meaningful
        return proto
    return simplified if ok else proto


def run_export(req: ExportRequest, log: Callable[[str], None] = print) -> ExportResult:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    selected = parse_backends(req.backends)  # a bad --backends fails before any work
    check_opset(req.opset, req.exporter)
    lm = build_model(req.variant, req.checkpoint, spatial_attn=req.spatial_attn, allow_pickle=req.allow_pickle, log=log)
    size = req.input_size or lm.variant.preprocess.input_size
    pp = lm.variant.preprocess.at(size)
    require_memory(lm.config, size, max(req.check_samples, VALIDATE_BATCH), f"deploy export --input-size {size}")
    dest = Path(req.output) if req.output else default_output(lm.variant.name, size, lm.variant.preprocess.input_size)
    staging = _Staging(dest, req.force, inputs=(req.checkpoint, req.val_data, req.calib_data))
    try:
        result = _export_into(req, lm, size, pp, staging.path, log, timings, selected, shown_as=str(dest))
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    timings["total_s"] = time.perf_counter() - t0
    result.folder = dest
    return result


def _export_into(req, lm, size, pp, folder: Path, log, timings, selected, shown_as: str) -> ExportResult:
    report = Report(title=f"{lm.variant.name} export")
    manifest = Manifest(
        variant=lm.variant.name,
        input_size=size,
        num_classes=lm.config.num_classes,
        preprocess=pp.to_dict(),
        checkpoint_sha256=lm.checkpoint_sha256,
        source={
            "checkpoint": str(Path(req.checkpoint).resolve()) if req.checkpoint else None,
            "format": lm.checkpoint.format if lm.checkpoint else None,
            "seed": None if lm.checkpoint else 0,
            "spatial_attn": lm.config.spatial_attn,
            "act": lm.config.act,
            "sources": lm.sources,
            "notes": lm.notes,
        },
        architecture=lm.config.to_dict(),
    )
    images = check_images(req, pp, log)
    report.section("inputs", {"check_set": images.source, "samples": len(images), "skipped_images": len(images.skipped)})
    if not images.user_data:
        log(f"note: checking on the {images.source}; pass --val-data DIR to check on your own images")

    t = time.perf_counter()
    original = lm.model
    if req.reparam:
        deploy_model, summary = reparameterize_model_with_summary(original, size)
        reparam_info = summary.to_dict()
    else:
        deploy_model, reparam_info = original, {"applied": False}
    reparam_info["params_before"] = count_params(original)
    reparam_info["params_after"] = count_params(deploy_model)
    reparam_info["macs_before"] = count_macs(original, size)
    reparam_info["macs_after"] = count_macs(deploy_model, size)
    timings["reparam_s"] = time.perf_counter() - t

    t = time.perf_counter()
    raw_path = folder / ".raw.onnx"
    proto = export_onnx(deploy_model, raw_path, size, opset=req.opset, exporter=req.exporter, force=True)
    timings["onnx_export_s"] = time.perf_counter() - t
    graph = {"exporter": req.exporter, "opset": req.opset, "exported": GraphStats.of(proto).__dict__}
    if req.reparam:
        with tempfile.TemporaryDirectory() as tmp:
            plain = export_onnx(original, Path(tmp) / "plain.onnx", size, opset=req.opset, exporter=req.exporter)
        graph["without_reparam"] = GraphStats.of(_simplified_or_same(plain)).__dict__

    t = time.perf_counter()
    final_path = folder / ONNX_FP32
    if req.simplify:
        proto, simp = _simplify(proto, raw_path, final_path, images.images, log)
    else:
        simp = {"applied": False, "reason": "--no-simplify"}
    graph["simplify"] = simp
    graph["final"] = GraphStats.of(proto).__dict__
    set_metadata(proto, metadata_props(manifest, "fp32"))
    onnx.checker.check_model(proto, full_check=True)
    save_onnx(proto, final_path, force=True)
    raw_path.unlink()
    timings["simplify_s"] = time.perf_counter() - t
    manifest.artifacts.append(Artifact.of(folder, ONNX_FP32, "onnxruntime", "fp32", role="reference ONNX"))
    reparam_info["onnx"] = graph
    report.section("reparameterization", reparam_info)

    exit_code = 0
    x = images.images
    ref_all = eager_logits(original, x) if req.check else None
    floor = fp32_noise_floor(original, x, ref_all) if req.check else 0.0
    if req.check:
        t = time.perf_counter()
        checks = {}
        checks["eager_fp32_vs_fp64"] = floor
        for label, batch in (("batch_1", x[:1]), (f"batch_{len(x)}", x)):
            got = ort_logits(final_path, batch, req.threads)
            drift = Drift.between(ref_all[: len(batch)], got)
            fails = TOLERANCES["fp32"].failures(drift, floor)
            checks[label] = {"drift": drift.to_dict(), "limit": TOLERANCES["fp32"].abs_limit(drift, floor),
                             "passed": not fails, "failures": fails}
            report.gate(f"onnxruntime fp32 vs eager ({label.replace('_', ' ')})", fails)
        if req.reparam:
            checks["reparam_only"] = Drift.between(ref_all, eager_logits(deploy_model, x)).to_dict()
        checks["tolerance"] = TOLERANCES["fp32"].to_dict()
        report.section("post_export_check", checks)
        timings["check_s"] = time.perf_counter() - t

    t = time.perf_counter()
    backends, unavailable = selected
    build_backends(folder, manifest, backends, unavailable, list(req.precisions), x, ref_all, floor, report, log,
                   req.threads, check=req.check)
    timings["backends_s"] = time.perf_counter() - t

    if req.int8:
        t = time.perf_counter()
        _int8(req, folder, manifest, backends, unavailable, original, pp, report, log)
        timings["int8_s"] = time.perf_counter() - t
    manifest.save(folder)  # validation and bench read the folder

    if req.check and req.validate:
        t = time.perf_counter()
        _validate(req, folder, report, log, shown_as)
        timings["validate_s"] = time.perf_counter() - t
    if req.bench:
        t = time.perf_counter()
        _bench(req, folder, report, log, shown_as)
        timings["bench_s"] = time.perf_counter() - t
    if report.failed:
        exit_code = 3
        log(f"error: a check failed: {'; '.join(report.failures)}")

    report.section("timings", {k: round(v, 3) for k, v in timings.items()})
    manifest.save(folder)
    report.environment = manifest.tool_versions
    report.manifest = manifest.to_dict()
    atomic_write_json(folder / "report.json", report.to_dict(), force=True)
    atomic_write_text(folder / "report.md", report.to_markdown(), force=True)
    return ExportResult(folder, report, exit_code, timings)
