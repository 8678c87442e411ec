"""Building each backend's artifacts from the reference ONNX, and checking each against eager."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from export.manifest import Artifact, Manifest
from partialnet.errors import DeployError, UsageError, WriteError
from runtimes.base import INPUT_NAME, OUTPUT_NAME
from runtimes.factory import BACKENDS, backend_status, open_runner

from .drift import TOLERANCES, Drift
from .report import Report

# Which precisions each backend builds from an FP32 ONNX (INT8 has its own path, from calibration).
PRECISIONS = {"onnxruntime": ("fp32",), "openvino": ("fp32", "bf16"), "tensorrt": ("fp32", "fp16")}
TRT_BATCH = (1, 1, 32)  # min, opt, max of the optimization profile


def parse_backends(text: str | None) -> tuple[list[str], dict[str, str]]:
    """The backends to build, and for each requested one that cannot run here, why (default: all usable)."""
    status = backend_status()
    if text is None:
        return [b for b in BACKENDS if status[b] is None], {}
    wanted = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}.")
    return [b for b in wanted if status[b] is None], {b: status[b] for b in wanted if status[b] is not None}


def run_logits(runner, x: np.ndarray, batch_size: int = 8) -> np.ndarray:
    outs = [runner.run({INPUT_NAME: x[i : i + batch_size]})[OUTPUT_NAME] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def check_artifact_against_eager(
    folder: Path, art: Artifact, x: np.ndarray, ref: np.ndarray, floor: float, report: Report, threads: int | None
) -> dict:
    """Run an artifact on the check batch (at batch 1 and the full batch) and gate it against eager."""
    runner = open_runner(art.backend, folder / art.path, precision=art.precision,
                         threads=None if art.backend == "tensorrt" else threads)
    try:
        tol = TOLERANCES[art.precision]
        out = {}
        for label, batch in (("batch_1", x[:1]), (f"batch_{len(x)}", x)):
            drift = Drift.between(ref[: len(batch)], run_logits(runner, batch))
            fails = tol.failures(drift, floor)
            out[label] = {"drift": drift.to_dict(), "passed": not fails, "failures": fails}
            report.gate(f"{art.backend} {art.precision} vs eager ({label.replace('_', ' ')})", fails)
        out["runner"] = getattr(runner, "options", {})
        return out
    finally:
        runner.close()


def build_backends(
    folder: Path,
    manifest: Manifest,
    backends: list[str],
    unavailable: dict[str, str],
    precisions: list[str],
    x: np.ndarray,
    ref: np.ndarray,
    floor: float,
    report: Report,
    log: Callable[[str], None],
    threads: int | None = None,
    check: bool = True,
) -> None:
    """Add every requested (backend, precision) artifact to the folder and manifest; skipped ones say why."""
    onnx_path = folder / "model.onnx"
    checks: dict[str, dict] = {}
    for backend, reason in unavailable.items():
        _skip(manifest, backend, "*", reason, log)
        if backend == "tensorrt":
            _tensorrt_script(folder, manifest, precisions)
    for backend in backends:
        for precision in precisions:
            if precision not in PRECISIONS[backend]:
                if precision != "fp32":
                    _skip(manifest, backend, precision, f"{backend} does not build {precision} from FP32 ONNX", log, quiet=True)
                continue
            try:
                art = _build(folder, manifest, backend, precision, onnx_path, x.shape[-1])
            except WriteError:  # a full disk is not a reason to skip a backend: the export stops
                raise
            except DeployError as e:
                _skip(manifest, backend, precision, str(e), log)
                continue
            if check and not (backend == "onnxruntime" and precision == "fp32"):  # the post-export check ran it
                checks[f"{backend}/{precision}"] = check_artifact_against_eager(folder, art, x, ref, floor, report, threads)
    report.section("backend_checks", checks)


def open_artifact(folder: Path, manifest: Manifest, backend: str, precision: str | None, threads: int | None = None,
                  **options):
    """A runner for the manifest's (backend, precision) artifact, after checking the backend and the file's hash.

    `options` go to the runner of that backend (e.g. spinning=False for onnxruntime).
    """
    from runtimes.artifacts import check_artifact
    from runtimes.base import BackendUnavailable

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose from eager, {', '.join(BACKENDS)}.")
    reason = backend_status()[backend]
    if reason is not None:
        raise BackendUnavailable(reason)
    art = manifest.find(backend, precision)
    check_artifact(folder / art.path, art.sha256)
    if "weights" in art.extra:
        check_artifact(folder / art.extra["weights"], art.extra.get("weights_sha256"))
    if backend == "openvino":
        # OpenVINO's compile cache beside the IR: the second run of an artifact skips compilation.
        options.setdefault("cache_dir", folder / "openvino" / "cache")
    return open_runner(backend, folder / art.path, precision=art.precision,
                       threads=None if backend == "tensorrt" else threads, **options), art


def _skip(manifest: Manifest, backend: str, precision: str, reason: str, log, quiet: bool = False) -> None:
    manifest.skipped.append({"backend": backend, "precision": precision, "reason": reason})
    if not quiet:
        log(f"skipped {backend}{'' if precision == '*' else ' ' + precision}: {reason}")


def _build(folder: Path, manifest: Manifest, backend: str, precision: str, onnx_path: Path, size: int) -> Artifact:
    if backend == "onnxruntime":
        return next(a for a in manifest.artifacts if a.backend == "onnxruntime" and a.precision == "fp32")
    if backend == "openvino":
        from runtimes.ov import convert_to_ir, require_inference_precision

        require_inference_precision(precision)
        xml = folder / "openvino" / "model.xml"
        if not xml.exists():
            convert_to_ir(onnx_path, xml)
        # bf16 is the same IR compiled with another inference-precision hint: its own row, one set of files.
        art = Artifact.of(folder, "openvino/model.xml", "openvino", precision, weights="openvino/model.bin",
                          weights_sha256=Artifact.of(folder, "openvino/model.bin", "openvino", precision).sha256,
                          inference_precision="f32" if precision == "fp32" else precision)
        manifest.artifacts.append(art)
        return art
    if backend == "tensorrt":
        from runtimes.trt import build_engine

        rel = f"tensorrt/model.{precision}.plan"
        info = build_engine(onnx_path, folder / rel, precision=precision, input_size=size, min_batch=TRT_BATCH[0],
                            opt_batch=TRT_BATCH[1], max_batch=TRT_BATCH[2], timing_cache=folder / "tensorrt" / "timing.cache")
        _tensorrt_script(folder, manifest, [precision])
        art = Artifact.of(folder, rel, "tensorrt", precision, **info)
        manifest.artifacts.append(art)
        return art
    raise UsageError(f"unknown backend {backend!r}")


def _tensorrt_script(folder: Path, manifest: Manifest, precisions: list[str]) -> None:
    """tensorrt/build.sh: the trtexec command that builds the engine on the target device itself."""
    from runtimes.trt import write_build_script

    for precision in [p for p in precisions if p in PRECISIONS["tensorrt"]]:
        dest = folder / "tensorrt" / ("build.sh" if precision == "fp32" else f"build.{precision}.sh")
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_build_script(dest, "../model.onnx", f"model.{precision}.plan", precision, manifest.input_size, *TRT_BATCH)
