"""INT8 artifacts for an export folder: one calibration, one exclusion policy, every backend.

`build_int8_artifacts` calibrates once on the given images (activation ranges cached under a key of model bytes,
images and preprocessing), optionally runs the sensitivity pass to keep the worst blocks in float until a requested
top-1 agreement or accuracy drop holds, then asks each backend to build its INT8 artifact(s) (deploy/backends) and
checks every one against the FP32 reference through the one comparison path (runtimes.compare). A backend that
fails is recorded as skipped with its reason and its files removed; the others are still built. Nothing here
decides an exit code: the caller gates on the report.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from calibration.ort_int8 import METHODS, QuantSession
from calibration.ov_int8 import resolve_int8_cpu
from calibration.policy import DEFAULT_POLICY, FloatPolicy
from calibration.sensitivity import Target, sensitivity_pass
from calibration.sources import ImageSet
from export.manifest import Artifact, metadata_props
from partialnet.errors import DeployError, UsageError, WriteError
from runtimes.compare import TOLERANCES, judge, run_all

from . import backends
from .backends import Backend, BuildContext, Int8Inputs, RunnerOptions

CHECK_BATCH = 16


@dataclass(frozen=True)
class Int8Request:
    """How to quantize: the calibration method, an optional sensitivity target, and OpenVINO's weight range."""

    method: str = "minmax"
    target_agreement: float | None = None
    max_accuracy_drop: float | None = None  # fraction of top-1; needs labelled validation images
    int8_cpu: str = "auto"  # which CPUs the OpenVINO INT8 weights must be exact on (calibration.ov_int8)
    ov_model_type: str = "cnn"
    cache_dir: Path | None = None  # keeps calibration ranges across runs (keyed); by default only for this call

    @property
    def wants_sensitivity(self) -> bool:
        return self.target_agreement is not None or self.max_accuracy_drop is not None


def check_request(ctx: BuildContext, targets: Sequence[Backend], calib: ImageSet, val: ImageSet | None,
                  req: Int8Request) -> None:
    """Every reason the INT8 build cannot start, before the slow calibration."""
    if not targets:
        raise UsageError("no INT8 backend requested; choose from " + ", ".join(backends.names()) + ".")
    resolve_int8_cpu(req.int8_cpu)
    if req.method not in METHODS:
        raise UsageError(f"calibration method {req.method!r} is not one of {', '.join(METHODS)}.")
    if not ctx.onnx.is_file():
        raise UsageError(f"{ctx.folder} has no {ctx.onnx.name}; INT8 is built from the FP32 export, so export first.")
    if len(calib) == 0:
        raise UsageError(f"the calibration set ({calib.source}) is empty; give at least one image.")
    if req.max_accuracy_drop is not None and (val is None or val.labels is None):
        raise UsageError("--max-accuracy-drop needs labelled validation images (class subfolders or a labelled .txt list).")
    if req.wants_sensitivity:
        Target(req.target_agreement, req.max_accuracy_drop)  # range checks, one wording


def check_int8(ctx: BuildContext, art: Artifact, sets: Sequence[tuple[str, ImageSet, np.ndarray]]) -> dict[str, Any]:
    """One INT8 artifact against the FP32 reference on each image set (with top-1 when labelled)."""
    runner = backends.open_row(ctx.folder, art, RunnerOptions(threads=ctx.threads))
    try:
        out: dict[str, Any] = {}
        for label, images, ref in sets:
            got = run_all({art.key: runner}, images.images, CHECK_BATCH)[art.key]
            verdict = judge(ref, got, TOLERANCES["int8"])
            entry: dict[str, Any] = {"drift": verdict.drift.to_dict(), "failures": verdict.failures}
            if images.labels is not None:
                entry["top1_fp32"] = float((ref.argmax(1) == images.labels).mean())
                entry["top1_int8"] = float((got.argmax(1) == images.labels).mean())
                entry["top1_drop"] = entry["top1_fp32"] - entry["top1_int8"]
            out[label] = entry
        out["tolerance"] = TOLERANCES["int8"].to_dict()
        return out
    finally:
        runner.close()


def build_int8_artifacts(ctx: BuildContext, targets: Sequence[Backend], calib: ImageSet, val: ImageSet | None,
                         fp32_logits: Callable[[np.ndarray], np.ndarray], req: Int8Request = Int8Request()
                         ) -> dict[str, Any]:
    """Build the INT8 artifacts of each target backend into ctx.folder, add their manifest rows, and return the
    report section. `fp32_logits(images)` gives the FP32 (eager) logits the artifacts are judged against."""
    check_request(ctx, targets, calib, val, req)
    report: dict[str, Any] = {"backends": [b.name for b in targets], "artifacts": {}, "skipped": []}
    sets = [("calibration", calib, fp32_logits(calib.images))]
    if val is not None:
        sets.append(("validation", val, fp32_logits(val.images)))

    with tempfile.TemporaryDirectory(prefix="partialnet-int8-") as work:
        session = QuantSession(ctx.onnx, calib, req.method, ctx.manifest.preprocess, workdir=Path(work),
                               cache_dir=req.cache_dir, log=ctx.console)
        policy = _policy(ctx, session, sets, req, report)
        session.ranges()
        report["calibration"] = session.calibration_info()
        report["pre_processing"] = session.pre_processing
        report["policy"] = policy.to_dict()
        if calib.skipped:
            report["calibration"]["skipped_examples"] = calib.skipped[:5]
        q = Int8Inputs(calib, val, session, policy, metadata_props(ctx.manifest, "int8"),
                       max_accuracy_drop=req.max_accuracy_drop, int8_cpu=req.int8_cpu,
                       ov_model_type=req.ov_model_type, row=_row(session, policy))
        for backend in targets:
            _build_one(ctx, backend, q, sets, report)
    return report


def _policy(ctx: BuildContext, session: QuantSession, sets, req: Int8Request, report: dict[str, Any]) -> FloatPolicy:
    """The default float policy, or, with a target, the one the sensitivity pass finds."""
    if not req.wants_sensitivity:
        return DEFAULT_POLICY
    _, images, ref = sets[-1]  # the validation images when given, else the calibration images
    use_val = len(sets) > 1
    result = sensitivity_pass(session, ref, Target(req.target_agreement, req.max_accuracy_drop),
                              images=images.images if use_val else None, labels=images.labels if use_val else None,
                              threads=ctx.threads, log=ctx.console)
    report["sensitivity"] = result.to_dict()
    if not result.met:
        ctx.console.warn(f"the INT8 target was not met even with {len(result.kept_float)} units in float")
    return result.policy(DEFAULT_POLICY)


def _build_one(ctx: BuildContext, backend: Backend, q: Int8Inputs, sets, report: dict[str, Any]) -> None:
    """One backend's INT8 artifacts, each checked; on failure its rows and files go and it is listed as skipped."""
    rows_before = len(ctx.manifest.artifacts)
    try:
        for art, info in backend.build_int8(ctx, q):
            info = _slim(info)
            info["check"] = check_int8(ctx, art, sets)
            report["artifacts"][art.key] = info
    except WriteError:  # a full disk is not a reason to skip a backend: the export stops
        raise
    except DeployError as e:
        for art in ctx.manifest.artifacts[rows_before:]:
            for rel, _ in art.files:
                (ctx.folder / rel).unlink(missing_ok=True)
        del ctx.manifest.artifacts[rows_before:]
        ctx.manifest.skip(backend.name, "int8", str(e))
        report["skipped"].append({"backend": backend.name, "reason": str(e)})
        ctx.console(f"skipped {backend.name} int8: {e}")


def _row(session: QuantSession, policy: FloatPolicy) -> dict[str, Any]:
    """The manifest's per-artifact facts: short, the report has the details."""
    return {
        "calibration_method": session.method,
        "calibration_source": session.calib.source,
        "calibration_size": len(session.calib),
        "policy": policy.name,
        "float_parts": list(policy.parts),
        "float_units": list(policy.units),
    }


def _slim(info: dict[str, Any]) -> dict[str, Any]:
    """A report entry without the long node-name lists (their count stays)."""
    out = {k: v for k, v in info.items() if k not in ("excluded_node_names", "ignored_names", "policy", "calibration")}
    if "excluded_node_names" in info:
        out["excluded_nodes"] = len(info["excluded_node_names"])
    return out
