"""`deploy validate`: every artifact of an export folder against the eager model, on the same images.

Measurement comes first and is plain data: logits, `Drift` against eager, accuracy and paired tests when the
images have labels, and the drift decomposed into export, runtime and precision steps. Judgement comes after:
the per-precision `TOLERANCES` and the user's gates fill a `Report`, and the caller turns `passed` into the
exit code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from calibration.sources import ImageSet, default_images, load_images
from export.layout import VALIDATION
from export.manifest import Artifact, Manifest
from partialnet.console import SILENT, Console
from partialnet.errors import UsageError
from partialnet.files import atomic_write_json, atomic_write_text
from partialnet.variants import Preprocess
from runtimes.compare import TOLERANCES, Drift, disagreement_notes, run_all
from runtimes.eager import fp32_noise_floor

from .backends import EAGER, RunnerOptions
from .opening import (ExportHandle, Opened, close_all, nothing_runs_error, open_export, open_rows,
                      require_export_memory, select_rows)
from .report import Report, isa_summary

DEFAULT_SAMPLES = 64  # images drawn from the embedded default set when no --data is given
BOOTSTRAP_RESAMPLES = 10_000
REDUCED_PRECISIONS = ("fp16", "bf16")


# --------------------------------------------------------------------------- statistics


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: 2 P(X <= min(b, c)), X ~ Bin(b + c, 1/2).

    Computed with exact integers (binomial coefficients built term by term), then one division; capped at 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    term = tail = 1
    for i in range(min(b, c)):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap_ci(reference_only: int, candidate_only: int, n: int, *, seed: int = 0,
                        resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of (candidate - reference) accuracy, resampling the n images with replacement, seeded.

    A resample's difference depends only on how many of its images are candidate-only and reference-only
    correct, so drawing n images is one multinomial draw over those two kinds and the rest: the same
    distribution as resampling indices, at O(resamples) cost whatever n is.
    """
    if n <= 0:
        raise ValueError(f"need at least one image, got n={n}")
    rng = np.random.default_rng(seed)
    p = np.array([candidate_only, reference_only, n - candidate_only - reference_only], dtype=np.float64) / n
    draws = rng.multinomial(n, p, size=resamples)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedComparison:
    """A candidate's accuracy against the reference's on the same images: the difference and how sure it is."""

    samples: int
    reference_correct: int
    candidate_correct: int
    reference_only: int  # right in the reference, wrong in the candidate (McNemar's b)
    candidate_only: int  # wrong in the reference, right in the candidate (McNemar's c)
    difference: float  # candidate minus reference accuracy, as a fraction
    mcnemar_p: float
    bootstrap_ci95: tuple[float, float]

    @classmethod
    def of(cls, reference_correct: np.ndarray, candidate_correct: np.ndarray, *, seed: int = 0) -> "PairedComparison":
        ref = np.asarray(reference_correct, dtype=bool)
        cand = np.asarray(candidate_correct, dtype=bool)
        if ref.shape != cand.shape or ref.ndim != 1 or not len(ref):
            raise ValueError(f"need two equal, non-empty 1-D outcome vectors, got {ref.shape} and {cand.shape}")
        b, c, n = int((ref & ~cand).sum()), int((~ref & cand).sum()), len(ref)
        return cls(n, int(ref.sum()), int(cand.sum()), b, c, (c - b) / n, mcnemar_exact(b, c),
                   paired_bootstrap_ci(b, c, n, seed=seed))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bootstrap_ci95"] = list(self.bootstrap_ci95)
        return d


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image: is the label among the k largest logits (ties broken by lower index, as in Drift)."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


# --------------------------------------------------------------------------- measurement


def read_images(data: str | None, pp: Preprocess, samples: int | None, seed: int, console: Console) -> ImageSet:
    """The user's images (sampled to `samples`, seeded), or DEFAULT_SAMPLES crops of the embedded set."""
    if data is None:
        return default_images(samples or DEFAULT_SAMPLES, pp, seed=seed)
    show = console.shows_progress and Path(data).suffix.lower() != ".npy"
    track = (lambda items: console.track(items, "reading images", "img")) if show else None
    return load_images(data, pp, limit=samples, seed=seed, progress=track)


def measure_row(key: str, backend: str, precision: str, eager: np.ndarray, logits: np.ndarray,
                labels: np.ndarray | None, seed: int, reference: bool = False) -> dict[str, Any]:
    """Plain numbers for one runner against eager: drift, and with labels accuracy and paired tests."""
    row: dict[str, Any] = {"key": key, "backend": backend, "precision": precision}
    row.update(Drift.between(eager, logits).to_dict())
    row["top1"] = row["top5"] = row["paired"] = None
    if labels is not None:
        top1, top5 = topk_correct(logits, labels, 1), topk_correct(logits, labels, 5)
        row["top1"], row["top5"] = float(top1.mean()), float(top5.mean())
        if not reference:
            e1, e5 = topk_correct(eager, labels, 1), topk_correct(eager, labels, 5)
            row["paired"] = {"top1": PairedComparison.of(e1, top1, seed=seed).to_dict(),
                             "top5": PairedComparison.of(e5, top5, seed=seed).to_dict()}
    return row


def _step(reference: str, candidate: str, logits: dict[str, np.ndarray]) -> dict[str, Any]:
    drift = Drift.between(logits[reference], logits[candidate])
    return {"reference": reference, "candidate": candidate, **drift.to_dict()}


def decompose(logits: dict[str, np.ndarray], opened: Sequence[Opened], reference_onnx: str) -> dict[str, Any]:
    """Split the drift into steps: export (ONNX FP32 vs eager), runtime (each backend's FP32 vs ONNX FP32),
    reduced precision (FP16/BF16 vs the same backend's FP32) and quantization (INT8 vs the same backend's FP32).

    Each step is a distance between two sets of logits; the steps do not add up to the end-to-end drift.
    """
    out: dict[str, Any] = {"export": [], "runtime": [], "reduced_precision": [], "quantization": [], "notes": []}
    has_onnx = reference_onnx in logits
    if has_onnx:
        out["export"].append(_step(EAGER.name, reference_onnx, logits))
    else:
        out["notes"].append(f"export and runtime drift need the reference ONNX ({reference_onnx}), which did not run")
    for o in opened:
        same_backend_fp32 = f"{o.backend}/fp32"
        if o.precision == "fp32" and o.key != reference_onnx and has_onnx:
            out["runtime"].append(_step(reference_onnx, o.key, logits))
        elif o.precision in REDUCED_PRECISIONS or o.precision == "int8":
            step = "quantization" if o.precision == "int8" else "reduced_precision"
            if same_backend_fp32 in logits:
                out[step].append(_step(same_backend_fp32, o.key, logits))
            else:
                out["notes"].append(f"{step.replace('_', ' ')} drift of {o.key} needs {same_backend_fp32}, "
                                    f"which did not run")
    return out


# --------------------------------------------------------------------------- judgement


@dataclass(frozen=True)
class Gates:
    """The user's gates; None leaves a gate off."""

    max_top1_drop: float | None = None  # percentage points of top-1 below eager
    min_agreement: float | None = None  # fraction of images whose top-1 matches eager's

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def judge_row(row: dict[str, Any], eager_top1: float | None, floor: float, gates: Gates, report: Report) -> None:
    """Add the precision's tolerance and the user's gates to the row and the report; the row gets `passed`."""
    drift = Drift(**{k: row[k] for k in Drift.__dataclass_fields__})
    name = f"{row['backend']} {row['precision']}"
    failures: list[str] = []
    tol = TOLERANCES.get(row["precision"])
    row["tolerance"] = tol.to_dict() if tol else None
    row["abs_limit"] = tol.abs_limit(drift, floor) if tol else None
    if tol is None:
        row["note"] = f"no tolerance is defined for {row['precision']}; only the user gates apply"
    else:
        fails = tol.failures(drift, floor)
        report.gate(f"{name} vs eager: {row['precision']} tolerance", fails)
        failures += fails
    if gates.min_agreement is not None:
        fails = [] if drift.top1_agreement >= gates.min_agreement else [
            f"top-1 agreement {drift.top1_agreement:.4f} is below --min-agreement {gates.min_agreement:g}"]
        report.gate(f"{name} vs eager: --min-agreement {gates.min_agreement:g}", fails)
        failures += fails
    row["top1_drop_points"] = None if row["top1"] is None or eager_top1 is None else (eager_top1 - row["top1"]) * 100
    if gates.max_top1_drop is not None and row["top1_drop_points"] is not None:
        drop = row["top1_drop_points"]
        fails = [] if drop <= gates.max_top1_drop else [
            f"top-1 {row['top1']:.2%} is {drop:.2f} points below eager's {eager_top1:.2%} "
            f"(--max-top1-drop {gates.max_top1_drop:g})"]
        report.gate(f"{name} vs eager: --max-top1-drop {gates.max_top1_drop:g}", fails)
        failures += fails
    row["failures"] = failures
    row["passed"] = not failures


# --------------------------------------------------------------------------- the run


@dataclass
class ValidateRequest:
    folder: str | Path
    data: str | None = None
    samples: int | None = None
    backends: str | None = None  # comma-separated; None = every artifact in the manifest
    max_top1_drop: float | None = None
    min_agreement: float | None = None
    threads: int | None = None
    batch_size: int = 16
    seed: int = 0  # image sampling and the bootstrap
    allow_pickle: bool = False


@dataclass
class Validation:
    document: dict[str, Any]
    markdown: str

    @property
    def passed(self) -> bool:
        return bool(self.document["passed"])


def run_validation(req: ValidateRequest, console: Console = SILENT) -> Validation:
    """`deploy validate DIR`: open the export from disk, read the images, and validate every selected row."""
    manifest = Manifest.load(req.folder)
    rows = select_rows(manifest, req.backends)
    gates = Gates(req.max_top1_drop, req.min_agreement)
    images = read_images(req.data, Preprocess.from_dict(manifest.preprocess), req.samples, req.seed, console)
    _require_labels(images, gates)  # before the model is rebuilt
    require_export_memory(manifest, min(req.batch_size, len(images)), f"deploy validate --batch-size {req.batch_size}")
    export = open_export(req.folder, manifest=manifest, allow_pickle=req.allow_pickle, console=console)
    return validate_export(export, rows, images, gates, console, threads=req.threads, batch_size=req.batch_size,
                           seed=req.seed)


def validate_export(export: ExportHandle, rows: Sequence[Artifact], images: ImageSet, gates: Gates, console: Console,
                    *, threads: int | None = None, batch_size: int = 16, seed: int = 0) -> Validation:
    """Measure eager and every row on the same images, judge, and write validation.json and validation.md into the
    export's folder; the caller picks the exit code."""
    manifest = export.manifest
    labels = _checked_labels(images, manifest.num_classes, gates, console)
    if not images.user_data:
        console(f"note: validating on the {images.source}; these images have no labels, so accuracy is not "
                f"measured, only agreement with eager. Pass --data DIR (class subfolders) for accuracy.")
    elif labels is None:
        console(f"note: {images.source} has no labels, so accuracy is not measured, only agreement with eager.")
    if images.skipped:
        console(f"note: skipped {len(images.skipped)} unreadable image(s), e.g. {images.skipped[0]}")

    options = RunnerOptions(threads=threads)
    eager = export.eager_runner(options)
    opened, skipped = open_rows(export.folder, rows, options, console)
    try:
        if not opened and rows:
            raise nothing_runs_error(rows, skipped)
        x = images.images
        console(f"validate: {len(x)} images through eager and {len(opened)} artifact(s)")
        runners = {o.key: o.runner for o in (eager, *opened)}
        logits = run_all(runners, x, batch_size, track=lambda s: console.track(s, "validate", "batch"))
        floor = fp32_noise_floor(export.model, x, logits[eager.key], batch_size)
    finally:
        close_all([eager, *opened])

    measured = [measure_row(o.key, o.backend, o.precision, logits[eager.key], logits[o.key], labels, seed,
                            reference=o is eager) for o in (eager, *opened)]
    for row, o in zip(measured, [eager, *opened]):
        row["runner"] = o.runner.name
        row["path"] = o.artifact.path if o.artifact else None
        row["scheme"] = o.artifact.scheme if o.artifact else None
        row["target"] = o.artifact.target if o.artifact else None

    report = Report(title=f"{manifest.variant} validation")
    eager_row = measured[0]
    eager_row.update(role="reference", noise_floor=floor, failures=[], passed=True)
    for row in measured[1:]:
        judge_row(row, eager_row["top1"], floor, gates, report)
    report.section("export", {"folder": str(export.shown_as), "variant": manifest.variant,
                              "input_size": manifest.input_size, "num_classes": manifest.num_classes,
                              "checkpoint_sha256": manifest.checkpoint_sha256})
    report.section("data", {"source": images.source, "samples": len(images), "labelled": labels is not None,
                            "user_data": images.user_data, "class_names": images.class_names,
                            "skipped_images": len(images.skipped), "seed": seed})
    report.section("artifacts", measured)
    report.section("decomposition", decompose(logits, opened, manifest.reference().key))
    report.section("skipped", skipped)
    report.section("not_exported", manifest.skipped)
    report.section("settings", {"gates": gates.to_dict(), "tolerances": {p: t.to_dict() for p, t in TOLERANCES.items()},
                                "noise_floor": floor, "threads": threads, "batch_size": batch_size,
                                "bootstrap_resamples": BOOTSTRAP_RESAMPLES})
    doc = report.to_document()
    markdown = validation_markdown(doc)
    atomic_write_json(export.folder / VALIDATION[0], doc, force=True)
    atomic_write_text(export.folder / VALIDATION[1], markdown, force=True)
    console(f"wrote {export.shown_as / VALIDATION[0]} and {export.shown_as / VALIDATION[1]}")
    if report.failed:
        console(f"validation failed: {'; '.join(report.failures)}")
    return Validation(doc, markdown)


def _require_labels(images: ImageSet, gates: Gates) -> None:
    if images.labels is None and gates.max_top1_drop is not None:
        raise UsageError(f"--max-top1-drop needs labelled images, but the data ({images.source}) has none; pass "
                         f"--data DIR with one subfolder per class, or a .txt list of 'path label' lines.")


def _checked_labels(images: ImageSet, num_classes: int, gates: Gates, console: Console) -> np.ndarray | None:
    _require_labels(images, gates)
    labels = images.labels
    if labels is None:
        return None
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UsageError(f"the data has label {int(labels.max() if labels.max() >= num_classes else labels.min())}, "
                         f"but the model has {num_classes} classes (0..{num_classes - 1}); check the data's labels.")
    names = images.class_names
    if names is not None and len(names) != num_classes:
        console(f"note: {len(names)} class subfolders for a {num_classes}-class model; labels are the subfolders' "
            f"positions in sorted order (torchvision ImageFolder), so accuracy means something only if subfolder i "
            f"is class i.")
    return labels


# --------------------------------------------------------------------------- rendering


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _num(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _paired_cells(row: dict[str, Any]) -> tuple[str, str, str]:
    p = (row.get("paired") or {}).get("top1")
    if p is None:
        return "-", "-", "-"
    lo, hi = p["bootstrap_ci95"]
    return (f"{p['difference'] * 100:+.2f}", f"[{lo * 100:+.2f}, {hi * 100:+.2f}]", f"{p['mcnemar_p']:.3g}")


ACCURACY_HEAD = ("top-1", "top-5", "Δtop-1 pts", "95% CI pts", "McNemar p")
DRIFT_HEAD = ("agreement", "top-5 overlap", "max abs Δlogit", "cosine", "mean KL", "result")


def _table(doc: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Header and rows of the artifact table; the accuracy columns only when the data has labels."""
    labelled = doc["data"]["labelled"]
    head = ("backend", "precision", *(ACCURACY_HEAD if labelled else ()), *DRIFT_HEAD)
    rows = []
    for r in doc["artifacts"]:
        accuracy = (_pct(r["top1"]), _pct(r["top5"]), *_paired_cells(r)) if labelled else ()
        result = "reference" if r.get("role") == "reference" else ("pass" if r["passed"] else "FAIL")
        rows.append((r["backend"], r["precision"], *accuracy, f"{r['top1_agreement']:.4f}", f"{r['top5_overlap']:.4f}",
                     _num(r["max_abs_logit_error"]), f"{r['cosine_similarity']:.6f}", _num(r["mean_kl"]), result))
    return head, rows


def _steps(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    dec = doc["decomposition"]
    return [(kind, s) for kind in ("export", "runtime", "reduced_precision", "quantization") for s in dec[kind]]


def format_validation(doc: dict[str, Any]) -> str:
    """The readable summary printed on stdout without --json."""
    head, body = _table(doc)
    rows = [head, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"{doc['export']['variant']} at {doc['export']['input_size']} px on {doc['data']['source']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if _steps(doc):
        lines += ["", "drift decomposition (max abs Δlogit, top-1 agreement):"]
        for kind, s in _steps(doc):
            lines.append(f"  {kind.replace('_', ' '):<17} {s['reference']} -> {s['candidate']}: "
                         f"{s['max_abs_logit_error']:.3g}, {s['top1_agreement']:.4f}")
    for note in doc["decomposition"]["notes"]:
        lines.append(f"  note: {note}")
    lines += [f"  {n}" for n in disagreement_notes(doc["artifacts"])]
    for s in doc["skipped"]:
        lines.append(f"skipped {s['backend']}/{s['precision']}: {s['reason']}")
    lines.append("")
    lines.append("PASSED" if doc["passed"] else f"FAILED: {'; '.join(doc['failures'])}")
    return "\n".join(lines)


def validation_markdown(doc: dict[str, Any]) -> str:
    """validation.md: the same numbers as validation.json, as tables."""
    ex, data = doc["export"], doc["data"]
    lines = [f"# {doc['title']}", "",
             f"Created {doc['created']}. Result: **{'PASSED' if doc['passed'] else 'FAILED'}**.", "",
             f"`{ex['folder']}`: {ex['variant']} at {ex['input_size']} px, {ex['num_classes']} classes.", "",
             f"Data: {data['source']}. " + ("Labelled: accuracy and paired tests against eager (McNemar exact test "
                                           "on the discordant images; seeded paired bootstrap 95% CI)."
                                           if data["labelled"] else
                                           "No labels: accuracy is not measured, only agreement with eager."), ""]
    head, body = _table(doc)
    lines += ["## Artifacts against eager", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += ["", f"Eager fp32-vs-float64 noise floor: {doc['settings']['noise_floor']:.3g} "
              f"(max abs logit difference).", ""]
    notes = disagreement_notes(doc["artifacts"])
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["## Drift decomposition", "",
              "Each step is a distance between two sets of logits on the same images; steps do not add up.", ""]
    if _steps(doc):
        lines += ["| step | reference | candidate | max abs Δlogit | mean abs Δlogit | cosine | top-1 agreement "
                  "| mean KL |", "|---|---|---|---|---|---|---|---|"]
        for kind, s in _steps(doc):
            lines.append(f"| {kind.replace('_', ' ')} | {s['reference']} | {s['candidate']} | "
                         f"{s['max_abs_logit_error']:.3g} | {s['mean_abs_logit_error']:.3g} | "
                         f"{s['cosine_similarity']:.6f} | {s['top1_agreement']:.4f} | {s['mean_kl']:.3g} |")
    lines += [f"- {n}" for n in doc["decomposition"]["notes"]]
    lines += ["", "## Gates", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {g['name']} | {'pass' if g['passed'] else 'FAIL'} | {'; '.join(g['failures']) or '-'} |"
              for g in doc["gates"]]
    if doc["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['backend']}/{s['precision']}: {s['reason']}" for s in doc["skipped"]]
    env = doc["environment"]
    lines += ["", "## Environment", "", f"- CPU: {env['cpu']} ({env['usable_cpus']} usable of {env['logical_cpus']})",
              f"- ISA extensions: {isa_summary(env)}", f"- GPU: {', '.join(env['gpu']) if env['gpu'] else 'none'}",
              f"- platform: {env['platform']}",
              "- libraries: " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items()), ""]
    return "\n".join(lines)
