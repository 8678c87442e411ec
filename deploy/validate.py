"""`deploy validate`: every artifact of an export folder against the eager model, on the same images.

Measurement comes first and is plain data: logits, `Drift` against eager, accuracy and paired tests when the
images have labels, and the drift decomposed into export, runtime and precision steps. Judgement comes after:
the per-precision `TOLERANCES` and the user's gates fill a `Report`, and the caller turns `passed` into the
exit code.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from calibration.sources import default_images, list_images, read_array, sample_rows
from calibration.stream import ArraySource, FileSource, file_source
from export.layout import MANIFEST, VALIDATION, VALIDATION_STATE
from export.manifest import Artifact, Manifest
from partialnet.console import SILENT, Console
from partialnet.errors import DeployError, UsageError
from partialnet.files import atomic_write_json, atomic_write_text, file_sha256
from partialnet.variants import Preprocess
from runtimes.compare import TOLERANCES, Drift, disagreement_notes

from .backends import EAGER, RunnerOptions
from .opening import (ExportHandle, Opened, close_all, nothing_runs_error, open_export, open_rows,
                      require_export_memory, select_rows)
from .report import Report, isa_summary
from .streaming import (CHECKPOINT_S, NOISE_FLOOR_ROWS, LogitStore, Measurer, RunState, RunSums, ShardResult, check_save_dir,
                        fingerprint, pair_name)

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
        return cls.of_counts(len(ref), int(ref.sum()), int(cand.sum()), int((ref & ~cand).sum()),
                             int((~ref & cand).sum()), seed=seed)

    @classmethod
    def of_counts(cls, n: int, reference_correct: int, candidate_correct: int, reference_only: int,
                  candidate_only: int, *, seed: int = 0) -> "PairedComparison":
        """The same from the disagreement table alone (what a streamed validation keeps)."""
        b, c = reference_only, candidate_only
        return cls(n, reference_correct, candidate_correct, b, c, (c - b) / n, mcnemar_exact(b, c),
                   paired_bootstrap_ci(b, c, n, seed=seed))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bootstrap_ci95"] = list(self.bootstrap_ci95)
        return d


# --------------------------------------------------------------------------- the images


@dataclass
class Data:
    """The images a validation streams: a batch source, labels per row, and what the report says of them."""

    source: FileSource | ArraySource
    names: list[str]  # one per row: the file, or array[row]
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    user_data: bool = True
    describe: Callable[[int], str] = str  # readable rows -> the report's source sentence
    where: str = ""  # the path, for messages
    identity: str = ""  # what the rows are, for the resume fingerprint

    def __len__(self) -> int:
        return len(self.names)


def read_images(data: str | None, pp: Preprocess, samples: int | None, seed: int, console: Console = SILENT, *,
                labels_file: str | None = None, class_index: str | None = None) -> Data:
    """The user's images (sampled to `samples`, seeded), or DEFAULT_SAMPLES crops of the embedded set; listed, not
    decoded: a folder is decoded batch by batch while it is validated, and a .npy is memory-mapped."""
    if data is None:
        if labels_file or class_index:
            raise UsageError("--labels and --class-index describe --data; pass --data too.")
        images = default_images(samples or DEFAULT_SAMPLES, pp, seed=seed)
        return Data(ArraySource(images.images), images.names, user_data=False, describe=lambda n: images.source,
                    identity=images.source)
    path = Path(data)
    if path.suffix.lower() == ".npy":
        if labels_file or class_index:
            raise UsageError(f"--labels and --class-index apply to image folders and lists, not to the array {path}.")
        arr = read_array(path, pp, mmap=True)
        rows = sample_rows(len(arr), samples, seed)
        st = path.stat()
        return Data(ArraySource(arr, rows), [f"{path.name}[{i}]" for i in rows],
                    describe=lambda n: f"array {path} ({len(rows)} of {len(arr)} rows)",
                    identity=fingerprint([str(path.resolve()), st.st_size, st.st_mtime_ns, rows]))
    listed = list_images(path, limit=samples, seed=seed, labels_file=labels_file, class_index=class_index)
    if not listed.files:
        raise DeployError(f"no readable images in {path}; expected jpg, png, webp or bmp files.")
    labels = np.asarray(listed.labels, np.int64) if listed.labels is not None else None
    names = [str(f) for f in listed.files]
    return Data(file_source(listed.files, pp), names, labels, listed.class_names, describe=listed.describe,
                where=str(path), identity=fingerprint([names, listed.labels]))


# --------------------------------------------------------------------------- measurement


@dataclass
class StreamOptions:
    """How a validation runs (none of it changes a figure): decoding workers, a cluster, resume, the logits."""

    workers: int = 0  # decoding processes; 0 decodes in this process
    cluster: str | None = None  # local:N or tcp://HOST:PORT
    resume: bool = False
    save_logits: Path | None = None
    state_dir: Path | None = None  # where the state and the logits live while running; None: a temporary folder
    allow_pickle: bool = False


@dataclass
class Measured:
    sums: RunSums
    store: LogitStore
    throughput: dict[str, Any] = field(default_factory=dict)


def needed_pairs(opened: Sequence[Opened], reference_onnx: str) -> list[tuple[str, str]]:
    """Every (reference, candidate) the report compares: each runner against eager, and the decomposition's steps."""
    pairs = [(opened[0].key, o.key) for o in opened]
    decompose(lambda r, c: pairs.append((r, c)) or {}, {o.key for o in opened}, opened[1:], reference_onnx)
    return list(dict.fromkeys(pairs))


def measure_stream(export: ExportHandle, runners: Sequence[Opened], data: Data, pairs: Sequence[tuple[str, str]],
                   batch_size: int, threads: int | None, stream: StreamOptions, console: Console) -> Measured:
    """Run every batch through every runner (here, or on a cluster), keeping only sums and logits on disk."""
    n, classes = len(data), export.manifest.num_classes
    batches = -(-n // batch_size)
    keys = [o.key for o in runners]
    manifest_file = export.folder / MANIFEST  # not written yet while `deploy export` validates its staging folder
    fp = fingerprint({"manifest": file_sha256(manifest_file) if manifest_file.exists() else "", "rows": data.identity,
                      "keys": keys, "batch_size": batch_size, "threads": threads, "labelled": data.labels is not None})
    temporary = stream.state_dir is None
    state_dir = Path(tempfile.mkdtemp(prefix="validate-")) if temporary else stream.state_dir
    state = _start_state(state_dir, fp, batches, stream.resume, console)
    store = LogitStore(state_dir / "logits", keys, n, classes, create=not state.done)
    todo = [i for i in range(batches) if i not in state.done]
    measurer = Measurer({o.key: o.runner for o in runners}, keys[0], export.model, pairs, classes)
    start = last_save = time.perf_counter()
    session = RunSums()
    try:
        results = _results(measurer, export, runners, data, batch_size, threads, todo, stream, pairs)
        for res in console.track(results, "validate", "batch", total=len(todo)):
            for k, v in res.logits.items():
                store.write(k, res.first * batch_size, v)
            state.sums.merge(res.sums)
            session.merge(res.sums)
            state.done.update(range(res.first, res.first + res.count))
            if not temporary and time.perf_counter() - last_save > CHECKPOINT_S:
                state.elapsed_s += time.perf_counter() - last_save
                last_save = time.perf_counter()
                state.save()
    except BaseException:
        store.close()
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            state.elapsed_s += time.perf_counter() - last_save
            state.save()
            console(f"validation interrupted after {len(state.done)} of {batches} batches; its state is in "
                    f"{state_dir}: run the same command with --resume to continue.")
        raise
    wall = time.perf_counter() - start
    if not temporary:
        state.elapsed_s += time.perf_counter() - last_save
        state.save()
    return Measured(state.sums, store, _throughput(session, wall, len(todo), batch_size, n, stream))


def _start_state(folder: Path, fp: str, batches: int, resume: bool, console: Console) -> RunState:
    found = RunState.load(folder) if (folder / "state.json").exists() else None
    if resume and found is not None and found.fingerprint == fp and found.batches == batches:
        console(f"resuming: {len(found.done)} of {batches} batches were done")
        return found
    if resume and found is not None:
        raise UsageError(f"the interrupted validation in {folder} was of other inputs (export, images, backends, "
                         f"--batch-size or --threads differ); run the same command as before with --resume, or "
                         f"without --resume to start over.")
    if resume:
        console(f"note: nothing to resume in {folder}; starting from the first batch")
    elif found is not None:
        console(f"note: starting over; the interrupted validation in {folder} is discarded (--resume continues one)")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return RunState(folder, fp, batches)


def _results(measurer: Measurer, export: ExportHandle, runners: Sequence[Opened], data: Data, batch_size: int,
             threads: int | None, todo: list[int], stream: StreamOptions,
             pairs: Sequence[tuple[str, str]]) -> Iterator[ShardResult]:
    if stream.cluster is None:
        return measurer.results(data.source, data.labels, batch_size, todo, stream.workers)
    from .cluster import Plan, cluster_results

    plan = Plan(str(export.folder), [o.key for o in runners[1:]], threads, stream.allow_pickle, list(pairs),
                export.manifest.num_classes)
    return cluster_results(stream.cluster, plan, data.source, data.labels, batch_size, todo)


def _throughput(sums: RunSums, wall: float, batches: int, batch_size: int, rows: int,
                stream: StreamOptions) -> dict[str, Any]:
    """images/s of each runner (its own compute time) and of the whole run, and how much of it was decoding."""
    images = sums.images + sums.unreadable
    compute = sum(sums.seconds.values())
    return {
        "images": images, "batches": batches, "wall_s": wall,
        "images_per_s": images / wall if wall > 0 else None,
        "runners_images_per_s": {k: images / s if s > 0 else None for k, s in sums.seconds.items()},
        "decode_s": sums.decode_s, "wait_for_decode_s": sums.wait_s,
        "decode_share": sums.decode_s / (sums.decode_s + compute) if sums.decode_s + compute > 0 else None,
        "workers": stream.workers, "cluster": stream.cluster,
    }


def measure_row(o: Opened, eager_key: str, m: Measured, labelled: bool, seed: int) -> dict[str, Any]:
    """Plain numbers for one runner against eager: drift, and with labels accuracy and paired tests."""
    sums, key = m.sums, o.key
    row: dict[str, Any] = {"key": key, "backend": o.backend, "precision": o.precision}
    row.update(Drift.from_sums(sums.drift[pair_name(eager_key, key)], m.store.pairs(eager_key, key)).to_dict())
    row["top1"] = row["top5"] = row["paired"] = None
    if labelled:
        n = sums.images
        row["top1"], row["top5"] = sums.top1[key] / n, sums.top5[key] / n
        row["per_class_top1"] = sums.class_top1[key]
        if key != eager_key:
            b1, c1, b5, c5 = sums.paired[key]
            row["paired"] = {
                "top1": PairedComparison.of_counts(n, sums.top1[eager_key], sums.top1[key], b1, c1, seed=seed).to_dict(),
                "top5": PairedComparison.of_counts(n, sums.top5[eager_key], sums.top5[key], b5, c5, seed=seed).to_dict()}
    return row


def decompose(step: Callable[[str, str], dict[str, Any]], ran: set[str], opened: Sequence[Opened],
              reference_onnx: str) -> dict[str, Any]:
    """Split the drift into steps: export (ONNX FP32 vs eager), runtime (each backend's FP32 vs ONNX FP32),
    reduced precision (FP16/BF16 vs the same backend's FP32) and quantization (INT8 vs the same backend's FP32).

    Each step is a distance between two sets of logits (`step(reference, candidate)`, of the keys that `ran`); the
    steps do not add up to the end-to-end drift.
    """
    out: dict[str, Any] = {"export": [], "runtime": [], "reduced_precision": [], "quantization": [], "notes": []}
    has_onnx = reference_onnx in ran
    if has_onnx:
        out["export"].append(step(EAGER.name, reference_onnx))
    else:
        out["notes"].append(f"export and runtime drift need the reference ONNX ({reference_onnx}), which did not run")
    for o in opened:
        same_backend_fp32 = f"{o.backend}/fp32"
        if o.precision == "fp32" and o.key != reference_onnx and has_onnx:
            out["runtime"].append(step(reference_onnx, o.key))
        elif o.precision in REDUCED_PRECISIONS or o.precision == "int8":
            kind = "quantization" if o.precision == "int8" else "reduced_precision"
            if same_backend_fp32 in ran:
                out[kind].append(step(same_backend_fp32, o.key))
            else:
                out["notes"].append(f"{kind.replace('_', ' ')} drift of {o.key} needs {same_backend_fp32}, "
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
    labels: str | None = None  # ground truth of a flat folder (Kaggle CSV or val.txt)
    class_index: str | None = None  # synset -> index
    workers: int | None = None  # decoding processes (None: the usable cores)
    cluster: str | None = None
    resume: bool = False
    save_logits: str | None = None


@dataclass
class Validation:
    document: dict[str, Any]
    markdown: str

    @property
    def passed(self) -> bool:
        return bool(self.document["passed"])


def run_validation(req: ValidateRequest, console: Console = SILENT) -> Validation:
    """`deploy validate DIR`: open the export from disk, list the images, and stream them through every row."""
    from runtimes.cpu import usable_cpus

    manifest = Manifest.load(req.folder)
    rows = select_rows(manifest, req.backends)
    gates = Gates(req.max_top1_drop, req.min_agreement)
    save = Path(req.save_logits) if req.save_logits else None
    if save is not None:
        check_save_dir(save)
    images = read_images(req.data, Preprocess.from_dict(manifest.preprocess), req.samples, req.seed, console,
                         labels_file=req.labels, class_index=req.class_index)
    _require_labels(images, gates)  # before the model is rebuilt
    require_export_memory(manifest, min(req.batch_size, len(images)), f"deploy validate --batch-size {req.batch_size}")
    if req.cluster is not None:
        from .cluster import require_dask

        require_dask()
    export = open_export(req.folder, manifest=manifest, allow_pickle=req.allow_pickle, console=console)
    workers = usable_cpus() if req.workers is None else req.workers
    stream = StreamOptions(workers=workers if isinstance(images.source, FileSource) else 0, cluster=req.cluster,
                           resume=req.resume, save_logits=save, state_dir=Path(req.folder) / VALIDATION_STATE,
                           allow_pickle=req.allow_pickle)
    return validate_export(export, rows, images, gates, console, threads=req.threads, batch_size=req.batch_size,
                           seed=req.seed, stream=stream)


def validate_export(export: ExportHandle, rows: Sequence[Artifact], images: Data, gates: Gates, console: Console,
                    *, threads: int | None = None, batch_size: int = 16, seed: int = 0,
                    stream: StreamOptions | None = None) -> Validation:
    """Measure eager and every row on the same images, judge, and write validation.json and validation.md into the
    export's folder; the caller picks the exit code."""
    stream = stream or StreamOptions()
    manifest = export.manifest
    labels = _checked_labels(images, manifest.num_classes, gates, console)
    if not images.user_data:
        console(f"note: validating on the {images.describe(len(images))}; these images have no labels, so accuracy "
                f"is not measured, only agreement with eager. Pass --data DIR (class subfolders) for accuracy.")
    elif labels is None:
        console(f"note: {images.describe(len(images))} has no labels, so accuracy is not measured, only agreement "
                f"with eager.")
    for name in VALIDATION:  # the report of an earlier run must not pass for this one's if it is interrupted
        (export.folder / name).unlink(missing_ok=True)

    options = RunnerOptions(threads=threads)
    eager = export.eager_runner(options)
    opened, skipped = open_rows(export.folder, rows, options, console)
    runners = [eager, *opened]
    try:
        if not opened and rows:
            raise nothing_runs_error(rows, skipped)
        where = f" on {stream.cluster}" if stream.cluster else f", {stream.workers} decoding worker(s)" \
            if stream.workers else ""
        console(f"validate: {len(images)} images through eager and {len(opened)} artifact(s){where}")
        m = measure_stream(export, runners, images, needed_pairs(runners, manifest.reference().key), batch_size,
                           threads, stream, console)
    finally:
        close_all(runners)
    try:
        validation = _report(export, runners, skipped, images, labels, m, gates, console, threads, batch_size, seed)
        if stream.save_logits is not None:
            m.store.publish(stream.save_logits, images.names, labels, m.store.ok_rows())
            console(f"wrote the logits of {len(runners)} runner(s) and files.txt to {stream.save_logits}")
    finally:
        m.store.close()
        shutil.rmtree(m.store.folder.parent, ignore_errors=True)  # the state folder: the run is complete
    return validation


def _report(export: ExportHandle, runners: Sequence[Opened], skipped: list[dict[str, str]], images: Data,
            labels: np.ndarray | None, m: Measured, gates: Gates, console: Console, threads: int | None,
            batch_size: int, seed: int) -> Validation:
    manifest, sums = export.manifest, m.sums
    eager, opened = runners[0], runners[1:]
    if not sums.images:
        detail = f" ({sums.unreadable} unreadable)" if sums.unreadable else ""
        raise DeployError(f"no readable images in {images.where}{detail}; expected jpg, png, webp or bmp files.")
    if sums.unreadable:
        console(f"note: skipped {sums.unreadable} unreadable image(s), e.g. {sums.errors[0]}")
    measured = [measure_row(o, eager.key, m, labels is not None, seed) for o in runners]
    for row, o in zip(measured, runners):
        row["runner"] = o.runner.name
        row["path"] = o.artifact.path if o.artifact else None
        row["scheme"] = o.artifact.scheme if o.artifact else None
        row["target"] = o.artifact.target if o.artifact else None

    report = Report(title=f"{manifest.variant} validation")
    floor = sums.noise_floor
    eager_row = measured[0]
    eager_row.update(role="reference", noise_floor=floor, failures=[], passed=True)
    for row in measured[1:]:
        judge_row(row, eager_row["top1"], floor, gates, report)

    def step(reference: str, candidate: str) -> dict[str, Any]:
        drift = Drift.from_sums(sums.drift[pair_name(reference, candidate)], m.store.pairs(reference, candidate))
        return {"reference": reference, "candidate": candidate, **drift.to_dict()}

    report.section("export", {"folder": str(export.shown_as), "variant": manifest.variant,
                              "input_size": manifest.input_size, "num_classes": manifest.num_classes,
                              "checkpoint_sha256": manifest.checkpoint_sha256})
    data = {"source": images.describe(sums.images), "samples": sums.images, "labelled": labels is not None,
            "user_data": images.user_data, "class_names": images.class_names, "skipped_images": sums.unreadable,
            "seed": seed}
    if labels is not None:
        data["class_counts"] = sums.class_totals
    report.section("data", data)
    report.section("artifacts", measured)
    report.section("decomposition", decompose(step, {o.key for o in runners}, opened, manifest.reference().key))
    report.section("skipped", skipped)
    report.section("not_exported", manifest.skipped)
    report.section("settings", {"gates": gates.to_dict(), "tolerances": {p: t.to_dict() for p, t in TOLERANCES.items()},
                                "noise_floor": floor, "noise_floor_images": min(len(images), _floor_rows(batch_size)),
                                "threads": threads, "batch_size": batch_size,
                                "bootstrap_resamples": BOOTSTRAP_RESAMPLES})
    report.section("throughput", m.throughput)
    doc = report.to_document()
    markdown = validation_markdown(doc)
    atomic_write_json(export.folder / VALIDATION[0], doc, force=True)
    atomic_write_text(export.folder / VALIDATION[1], markdown, force=True)
    console(f"wrote {export.shown_as / VALIDATION[0]} and {export.shown_as / VALIDATION[1]}")
    t = m.throughput
    if t.get("images_per_s"):
        console(f"validate: {t['images']} images in {t['wall_s']:.1f} s ({t['images_per_s']:.1f} images/s); "
                + _runner_rates(t))
    if report.failed:
        console(f"validation failed: {'; '.join(report.failures)}")
    return Validation(doc, markdown)


def _runner_rates(throughput: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.0f} images/s" for k, v in throughput["runners_images_per_s"].items() if v)


def _floor_rows(batch_size: int) -> int:
    """Rows of the batches the noise floor is measured on (those starting before NOISE_FLOOR_ROWS)."""
    return -(-NOISE_FLOOR_ROWS // batch_size) * batch_size


def _require_labels(images: Data, gates: Gates) -> None:
    if images.labels is None and gates.max_top1_drop is not None:
        raise UsageError(f"--max-top1-drop needs labelled images, but the data ({images.describe(len(images))}) has "
                         f"none; pass --data DIR with one subfolder per class, or a .txt list of 'path label' lines.")


def _checked_labels(images: Data, num_classes: int, gates: Gates, console: Console) -> np.ndarray | None:
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
              f"(max abs logit difference, on the first {doc['settings'].get('noise_floor_images', '-')} images).", ""]
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
    t = doc.get("throughput") or {}
    if t.get("images_per_s"):
        lines += ["", "## Throughput", "",
                  f"{t['images']} images in {t['wall_s']:.1f} s ({t['images_per_s']:.1f} images/s"
                  + (f", on {t['cluster']}" if t.get("cluster") else f", {t['workers']} decoding worker(s)")
                  + f"); decoding {t['decode_s']:.1f} s, {_pct(t['decode_share'])} of decoding plus runner time. "
                  "Per runner (its own compute time): " + _runner_rates(t) + "."]
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
