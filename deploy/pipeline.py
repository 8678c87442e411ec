"""`deploy export`: checkpoint -> reparameterized model -> ONNX (+ onnxsim) -> checked artifacts in one folder.

Everything is written into a staging folder beside the destination and renamed into place at the end, so an
interrupted export never leaves a folder that looks complete. An existing destination is kept unless `force`.
Each step is a function on the objects the export already holds (the model, the manifest, a BuildContext):
validation and the benchmark run on them too, and the manifest is written once, at the end.
"""
from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch

from calibration.sources import ImageSet, default_images, load_images
from export.layout import REFERENCE_ONNX, REPORT
from export.manifest import Artifact, Manifest, metadata_props
from export.fold import deploy_form, explain_export_error
from export.to_onnx import DEFAULT_OPSET, ExportError, GraphStats, check_opset, export_onnx, save_onnx, set_metadata
from partialnet import LoadedModel, build_model
from partialnet.factory import FactoryModel
from partialnet.console import SILENT, Console
from partialnet.errors import DeployError, ExitStatus, UsageError, WriteError, first_line
from partialnet.files import atomic_write_json, atomic_write_text
from partialnet.profile import count_macs, count_params
from partialnet.variants import Preprocess
from runtimes.compare import TOLERANCES, Drift, judge, run_all
from runtimes.eager import fp32_noise_floor

from . import backends
from .backends import EAGER, Backend, BuildContext, RunnerOptions
from .opening import ExportHandle
from .precisions import parse_precisions
from .report import Report
from .staging import ExportStaging as _Staging

CHECK_SAMPLES = 8
CALIB_SIZE = 512
DEFAULT_CALIB_IMAGES = 128  # the embedded default set: all of it is used when --calib-size asks for more
VALIDATE_SAMPLES = 64
VALIDATE_BATCH = 16  # validate_export's default batch
BENCH_WARMUP_S, BENCH_DURATION_S = 0.5, 2.0
SIMPLIFY_RTOL = 1e-5


@dataclass
class ExportRequest:
    variant: str  # a variant name, a zoo name, FILE.py:FACTORY or package.module:FACTORY
    checkpoint: str | None = None
    weights: str | None = None  # a state dict for a factory's model
    num_classes: int | None = None  # passed to a factory that takes it
    mean: tuple[float, float, float] | None = None  # preprocessing overrides (None: the model's own, ImageNet's)
    std: tuple[float, float, float] | None = None
    crop_ratio: float | None = None
    interpolation: str | None = None
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
    threads: int | None = None
    backends: str | None = None  # comma-separated; None = every backend usable here
    precisions: tuple[str, ...] = ("fp32",)  # float precisions; fp32 is always built
    int8: bool = False
    calib_data: str | None = None
    calib_size: int = CALIB_SIZE
    calib_method: str = "minmax"
    int8_cpu: str = "auto"  # which CPUs the OpenVINO INT8 weights are exact on: auto, any, vnni
    target_agreement: float | None = None
    max_accuracy_drop: float | None = None  # fraction of top-1
    validate: bool = True
    bench: bool = True

    def __post_init__(self) -> None:
        self.precisions = parse_precisions(self.precisions)  # fp32 always, whatever a caller passes


@dataclass
class ExportResult:
    folder: Path
    report: Report
    exit_code: ExitStatus


def default_output(variant: str, input_size: int, default_size: int) -> Path:
    return Path("exports") / (variant if input_size == default_size else f"{variant}_{input_size}")


class _Timings(dict):
    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self[f"{name}_s"] = round(time.perf_counter() - t, 3)


def run_export(req: ExportRequest, console: Console = SILENT) -> ExportResult:
    selected = backends.parse_backends(req.backends)  # a bad --backends or --opset fails before any work
    check_opset(req.opset, req.exporter)
    precisions = list(req.precisions)
    lm = load_model(req, console)
    size = req.input_size or lm.preprocess.input_size
    lm.require_memory(size, max(CHECK_SAMPLES, VALIDATE_BATCH), f"deploy export --input-size {size}")
    dest = Path(req.output) if req.output else default_output(lm.name, size, lm.preprocess.input_size)
    staging = _Staging(dest, req.force, inputs=(req.checkpoint, req.weights, req.val_data, req.calib_data))
    try:
        result = _export_into(req, lm, size, staging.path, dest, selected, precisions, console)
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    result.folder = dest
    return result


def load_model(req: ExportRequest, console: Console) -> "LoadedModel | FactoryModel":
    """A PartialNet variant (--checkpoint), or a factory's / zoo model (--weights, --num-classes)."""
    from partialnet.factory import build_from_factory, parse_target

    if parse_target(req.variant) is None:  # a variant name; an unknown one is an error naming the closest
        if req.weights:
            raise UsageError(f"--weights loads a state dict into a factory's model (FILE.py:FACTORY); the variant "
                             f"{req.variant} takes --checkpoint.")
        return build_model(req.variant, req.checkpoint, spatial_attn=req.spatial_attn, num_classes=req.num_classes,
                           allow_pickle=req.allow_pickle, log=console)
    if req.checkpoint or req.spatial_attn is not None:
        raise UsageError(f"--checkpoint and --(no-)spatial-attn apply to PartialNet variants; pass the weights of "
                         f"{req.variant} with --weights.")
    return build_from_factory(req.variant, req.weights, num_classes=req.num_classes, input_size=req.input_size,
                              allow_pickle=req.allow_pickle)


def preprocess_for(req: ExportRequest, model_pp: Preprocess, size: int) -> Preprocess:
    """The model's preprocessing at `size`, with what --mean/--std/--crop-ratio/--interpolation override."""
    pp = model_pp.at(size)
    return Preprocess(size, req.crop_ratio or pp.crop_ratio, req.interpolation or pp.interpolation,  # type: ignore[arg-type]
                      req.mean or pp.mean, req.std or pp.std)


def new_manifest(lm: "LoadedModel | FactoryModel", size: int, pp: Preprocess) -> Manifest:
    return Manifest(
        variant=lm.name,
        input_size=size,
        num_classes=lm.num_classes,
        preprocess=pp.to_dict(),
        checkpoint_sha256=lm.checkpoint_sha256,
        source=lm.source,
        architecture=lm.architecture,
    )


def _export_into(req: ExportRequest, lm: "LoadedModel | FactoryModel", size: int, folder: Path, dest: Path,
                 selected: tuple[list[Backend], dict[str, str]], precisions: list[str],
                 console: Console) -> ExportResult:
    pp = preprocess_for(req, lm.preprocess, size)
    report = Report(title=f"{lm.name} export")
    manifest = new_manifest(lm, size, pp)
    ctx = BuildContext(folder, manifest, console, threads=req.threads)
    export = ExportHandle(folder, manifest, lm.model, dest)
    timings = _Timings()

    images = check_images(req, pp, console)
    report.section("inputs", {"check_set": images.source, "samples": len(images), "skipped_images": len(images.skipped)})
    with timings.step("reference"):
        deploy_model = write_reference(req, lm.model, ctx, images.images, report)
    checker = _Checker(export, images.images, req.threads, report) if req.check else None
    if checker is not None:
        with timings.step("check"):
            checker.post_export(deploy_model)
    usable, unavailable = selected
    with timings.step("backends"):
        build_float(ctx, usable, unavailable, precisions, checker, report)
    if req.int8:
        with timings.step("int8"):
            build_int8(req, ctx, usable, unavailable, lm.model, pp, report)
    if req.check and req.validate:
        with timings.step("validate"):
            _validate(req, export, report, console)
    if req.bench:
        with timings.step("bench"):
            _bench(req, export, report, console)
    exit_code = ExitStatus.OK
    if report.failed:
        exit_code = ExitStatus.GATE_FAILED
        console(f"error: a check failed: {'; '.join(report.failures)}")

    report.section("timings", dict(timings))
    manifest.save(folder)
    report.manifest = manifest.to_dict()
    atomic_write_json(folder / REPORT[0], report.to_dict(), force=True)
    atomic_write_text(folder / REPORT[1], report.to_markdown(), force=True)
    return ExportResult(folder, report, exit_code)


def check_images(req: ExportRequest, pp: Preprocess, console: Console) -> ImageSet:
    """The fixed batch the post-export check runs: the user's images, or the embedded deterministic set."""
    if req.val_data:
        return load_images(req.val_data, pp, limit=CHECK_SAMPLES, seed=0)
    images = default_images(CHECK_SAMPLES, pp, seed=0)
    console(f"note: checking on the {images.source}; pass --val-data DIR to check on your own images")
    return images


# --------------------------------------------------------------------------- the reference ONNX


def write_reference(req: ExportRequest, original: torch.nn.Module, ctx: BuildContext, x: np.ndarray,
                    report: Report) -> torch.nn.Module:
    """Reparameterize, export and simplify into model.onnx, record it in the manifest; returns the deploy model."""
    size = ctx.manifest.input_size
    if req.reparam:
        deploy_model, summary = deploy_form(original, size)
        info: dict[str, Any] = summary.to_dict()
    else:
        deploy_model, info = original, {"applied": False}
    info.update(params_before=count_params(original), params_after=count_params(deploy_model),
                macs_before=count_macs(original, size), macs_after=count_macs(deploy_model, size))

    raw_path = ctx.folder / ".raw.onnx"
    try:
        proto = export_onnx(deploy_model, raw_path, size, opset=req.opset, exporter=req.exporter, force=True)
    except ExportError as e:
        where = explain_export_error(deploy_model, str(e))
        if where is None:
            raise
        raise ExportError(f"{where} at opset {req.opset}; replace it with ops ONNX has, or try another --opset "
                          f"or --exporter.") from e
    graph: dict[str, Any] = {"exporter": req.exporter, "opset": req.opset, "exported": GraphStats.of(proto).__dict__}
    if req.reparam:
        # Statistics only: a user's training-form model may not export as it is (shape reads that the graph
        # passes make constant), and that is no reason to stop.
        try:
            with tempfile.TemporaryDirectory() as tmp:
                plain = export_onnx(original, Path(tmp) / "plain.onnx", size, opset=req.opset, exporter=req.exporter)
            graph["without_reparam"] = GraphStats.of(_simplified_or_same(plain)).__dict__
        except ExportError as e:
            graph["without_reparam"] = {"error": str(e)}

    final_path = ctx.onnx
    if req.simplify:
        proto, graph["simplify"] = _simplify(proto, raw_path, final_path, x, ctx.console)
    else:
        graph["simplify"] = {"applied": False, "reason": "--no-simplify"}
    graph["final"] = GraphStats.of(proto).__dict__
    set_metadata(proto, metadata_props(ctx.manifest, "fp32"))
    onnx.checker.check_model(proto, full_check=True)
    save_onnx(proto, final_path, force=True)
    raw_path.unlink()
    ctx.artifact(REFERENCE_ONNX, backends.reference_backend().name, "fp32", role="reference ONNX")
    info["onnx"] = graph
    report.section("reparameterization", info)
    return deploy_model


def _reference_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """The reference backend's logits for an ONNX file on x, in one batch (what a user's session computes)."""
    runner = backends.reference_backend().open(path, "fp32", RunnerOptions())
    try:
        return run_all({"onnx": runner}, x, len(x))["onnx"]
    finally:
        runner.close()


def _simplify(proto: onnx.ModelProto, raw_path: Path, dest: Path, x: np.ndarray,
              console: Console) -> tuple[onnx.ModelProto, dict]:
    """onnxsim, then re-validate on real inputs; on any failure keep the unsimplified graph and say why."""
    import onnxsim

    info: dict[str, Any] = {"applied": False}
    try:
        simplified, ok = onnxsim.simplify(proto, initializers_as_constants=False)
    except Exception as e:  # onnxsim raises many types; the unsimplified graph is still valid
        info["reason"] = f"onnxsim failed: {first_line(e)}"
        console(f"note: {info['reason']}; keeping the unsimplified graph")
        return proto, info
    if not ok:
        info["reason"] = "onnxsim's own check failed"
        console("note: onnxsim's check failed; keeping the unsimplified graph")
        return proto, info
    save_onnx(simplified, dest, force=True)
    before, after = _reference_logits(raw_path, x), _reference_logits(dest, x)
    err = float(np.abs(before - after).max())
    limit = SIMPLIFY_RTOL * max(1.0, float(np.abs(before).max()))
    info["max_abs_change"] = err
    if err > limit:
        info["reason"] = f"simplified graph changed the logits by {err:.3g} (> {limit:.3g})"
        console(f"note: {info['reason']}; keeping the unsimplified graph")
        return proto, info
    info["applied"] = True
    return simplified, info


def _simplified_or_same(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim's result for statistics only (node counts of the training-form graph)."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(proto, initializers_as_constants=False)
    except Exception:  # statistics of the unsimplified graph are still meaningful
        return proto
    return simplified if ok else proto


# --------------------------------------------------------------------------- checks against eager


class _Checker:
    """Every float artifact against the eager model on the check images, at batch 1 and the whole batch."""

    def __init__(self, export: ExportHandle, x: np.ndarray, threads: int | None, report: Report):
        self.export, self.x, self.threads, self.report = export, x, threads, report
        eager = EAGER.open_model(export.model, export.manifest.input_size, RunnerOptions(threads=threads))
        self.eager = run_all({EAGER.name: eager}, x, len(x))[EAGER.name]
        self.floor = fp32_noise_floor(export.model, x, self.eager)
        self.checks: dict[str, Any] = {}

    def post_export(self, deploy_model: torch.nn.Module) -> None:
        """The reference ONNX against eager (its exit-3 gate), and what reparameterization alone moved."""
        section: dict[str, Any] = {"eager_fp32_vs_fp64": self.floor}
        section.update(self.artifact(self.export.manifest.reference()))
        if deploy_model is not self.export.model:
            deployed = EAGER.open_model(deploy_model, self.export.manifest.input_size, RunnerOptions())
            section["reparam_only"] = Drift.between(self.eager, run_all({"d": deployed}, self.x, len(self.x))["d"]).to_dict()
        section["tolerance"] = TOLERANCES["fp32"].to_dict()
        self.report.section("post_export_check", section)

    def artifact(self, art: Artifact) -> dict[str, Any]:
        """Run one artifact on the check batch at batch 1 and the full batch, gate it, and return the record."""
        runner = backends.open_row(self.export.folder, art, RunnerOptions(threads=self.threads))
        try:
            tol = TOLERANCES[art.precision]
            out: dict[str, Any] = {}
            for batch in (1, len(self.x)):
                label = f"batch_{batch}"
                got = run_all({art.key: runner}, self.x[:batch] if batch == 1 else self.x, batch)[art.key]
                verdict = judge(self.eager[: len(got)], got, tol, self.floor)
                out[label] = {"drift": verdict.drift.to_dict(), "limit": verdict.limit, "passed": verdict.passed,
                              "failures": verdict.failures}
                self.report.gate(f"{art.backend} {art.precision} vs eager (batch {batch})", verdict.failures)
            out["runner"] = getattr(runner, "options", {})
            return out
        finally:
            runner.close()


# --------------------------------------------------------------------------- backends


def build_float(ctx: BuildContext, usable: list[Backend], unavailable: dict[str, str], precisions: list[str],
                checker: _Checker | None, report: Report) -> None:
    """Every requested (backend, float precision) artifact, each checked against eager; skipped ones say why."""
    checks: dict[str, dict] = {}
    for name, reason in unavailable.items():
        ctx.manifest.skip(name, "*", reason)
        ctx.console(f"skipped {name}: {reason}")
        backends.get(name).prepare_offline(ctx, precisions)
    reference = ctx.manifest.reference()
    for backend in usable:
        for precision in precisions:
            if precision not in backend.float_precisions:
                if precision != "fp32":
                    ctx.manifest.skip(backend.name, precision, f"{backend.name} does not build {precision} from FP32 ONNX")
                continue
            try:
                art = backend.build(ctx, precision)
            except WriteError:  # a full disk is not a reason to skip a backend: the export stops
                raise
            except DeployError as e:
                ctx.manifest.skip(backend.name, precision, str(e))
                ctx.console(f"skipped {backend.name} {precision}: {e}")
                continue
            if checker is not None and art is not reference:  # the post-export check ran the reference
                checks[art.key] = checker.artifact(art)
    report.section("backend_checks", checks)


def calibration_images(req: ExportRequest, pp: Preprocess, console: Console) -> ImageSet:
    """--calib-data (seeded, stratified sample of --calib-size), or the embedded default set, said plainly."""
    if req.calib_data:
        calib = load_images(req.calib_data, pp, limit=req.calib_size, seed=0)
        if calib.skipped:
            console(f"note: skipped {len(calib.skipped)} unreadable calibration image(s), e.g. {calib.skipped[0]}")
        return calib
    calib = default_images(min(req.calib_size, DEFAULT_CALIB_IMAGES), pp, seed=0)
    console.warn(f"INT8 is calibrated on the {calib.source}, NOT on your data; pass --calib-data DIR "
                 f"(a few hundred of your own images) for a calibration you can trust")
    return calib


def build_int8(req: ExportRequest, ctx: BuildContext, usable: list[Backend], unavailable: dict[str, str],
               original: torch.nn.Module, pp: Preprocess, report: Report) -> None:
    from .int8 import Int8Request, build_int8_artifacts

    calib = calibration_images(req, pp, ctx.console)
    val = load_images(req.val_data, pp, seed=0) if req.val_data else None
    # A backend that cannot run here may still build its INT8 source files (TensorRT's Q/DQ ONNX needs no GPU).
    targets = usable + [backends.get(n) for n in unavailable if backends.get(n).builds_offline]
    eager = EAGER.open_model(original, ctx.manifest.input_size, RunnerOptions(threads=req.threads))
    section = build_int8_artifacts(
        ctx, targets, calib, val, lambda x: run_all({EAGER.name: eager}, x, 16)[EAGER.name],
        Int8Request(method=req.calib_method, target_agreement=req.target_agreement,
                    max_accuracy_drop=req.max_accuracy_drop, int8_cpu=req.int8_cpu))
    section["calibrated_on_user_data"] = calib.user_data
    if not calib.user_data:
        section["warning"] = f"calibrated on the {calib.source}, not on the user's data"
    report.section("int8", section)


# --------------------------------------------------------------------------- validation and benchmark


def _validate(req: ExportRequest, export: ExportHandle, report: Report, console: Console) -> None:
    """Every artifact against eager on the validation data (or the default set): the gates of `deploy validate`."""
    from .validate import Gates, read_images, validate_export

    drop = req.max_accuracy_drop * 100 if req.max_accuracy_drop is not None else None
    # Without --val-data, a sample of the calibration data is still the user's own domain; the embedded photos
    # would be out of distribution for, say, a digits model. It is not held out: the report says so.
    data = req.val_data or (req.calib_data if req.int8 else None)
    held_out = bool(req.val_data)
    if data and not held_out:
        console("note: validating on a sample of --calib-data (not held out); pass --val-data for held-out images")
    pp = Preprocess.from_dict(export.manifest.preprocess)
    images = read_images(data, pp, None if held_out else VALIDATE_SAMPLES, 0 if held_out else 1, console)
    val = validate_export(export, list(export.manifest.artifacts), images, Gates(max_top1_drop=drop), console,
                          threads=req.threads)
    doc = val.document
    report.section("validation", {
        "data": doc["data"]["source"],
        "held_out": held_out,
        "artifacts": [{k: row.get(k) for k in ("key", "backend", "precision", "top1", "top1_agreement",
                                               "max_abs_logit_error", "cosine_similarity", "passed")}
                      for row in doc["artifacts"]],
        "files": ["validation.json", "validation.md"],
    })
    for gate in doc["gates"]:
        report.gate(f"validate: {gate['name']}", gate["failures"])


def _bench(req: ExportRequest, export: ExportHandle, report: Report, console: Console) -> None:
    """A short interleaved latency run at batch 1 (the plot, and INT8 against FP32 on each backend)."""
    from .bench import BenchSettings, bench_export

    settings = BenchSettings(batch_sizes=(1,), threads=req.threads, warmup_s=BENCH_WARMUP_S,
                             duration_s=BENCH_DURATION_S)
    rows = bench_export(export, list(export.manifest.artifacts), settings, console).document["rows"]
    fp32 = {r["backend"]: r["p50_ms"] for r in rows if r["precision"] == "fp32"}
    int8_vs_fp32 = {}
    for r in rows:
        if r["precision"] != "int8" or r["backend"] not in fp32:
            continue
        ratio = r["p50_ms"] / fp32[r["backend"]]
        entry: dict[str, Any] = {"int8_p50_ms": r["p50_ms"], "fp32_p50_ms": fp32[r["backend"]], "int8_over_fp32": ratio,
                                 "faster": ratio < 1.0}
        if ratio >= 1.0:
            entry["note"] = (f"{r['key']} is not faster than fp32 here ({r['p50_ms']:.2f} vs {fp32[r['backend']]:.2f} "
                             f"ms p50): see bench.md; short export-time runs on a busy machine are noisy, rerun "
                             f"'deploy bench'")
            console(f"note: {entry['note']}")
        int8_vs_fp32[r["key"]] = entry
    report.section("latency", {
        "rows": [{k: r[k] for k in ("key", "backend", "precision", "batch_size", "p50_ms", "p90_ms", "speedup_vs_eager")}
                 for r in rows],
        "int8_vs_fp32": int8_vs_fp32,
        "settings": {"batch_size": 1, "threads": req.threads, "warmup_s": BENCH_WARMUP_S, "duration_s": BENCH_DURATION_S},
        "files": ["bench.json", "bench.md", "bench.png"],
    })
