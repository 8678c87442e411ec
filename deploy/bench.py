"""`deploy bench`: latency (or throughput) of the eager model and every artifact, each in its own process.

Runners never time themselves. deploy/timing.py opens every runner in a worker process of its own, configured as
a user deploys it, and hands the workers slices round-robin, one computing at a time, so that load from other
processes falls on all of them alike and no framework's thread pool slows another's. `Latency` holds the plain
per-call times; rows, Markdown, the plot and the files are made from that data afterwards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from calibration.sources import default_images
from export.layout import BENCH
from export.manifest import Artifact, Manifest
from partialnet.console import SILENT, Console
from partialnet.errors import UsageError
from partialnet.files import atomic_write_json, atomic_write_text
from partialnet.variants import Preprocess
from runtimes.compare import Drift, disagreement_notes, run_all
from runtimes.cpu import usable_cores

from .backends import RunnerOptions
from .opening import (ExportHandle, Opened, close_all, nothing_runs_error, open_export, open_rows,
                      require_export_memory, select_rows)
from .report import Report, isa_summary
from .timing import Mode, Timed, WorkerInfo, WorkerSpec, close_workers, open_workers, round_robin, send_inputs

SLICE_S = 0.2  # one turn of a worker in the round-robin
MIN_CALLS = 5  # per (runner, batch size), however long a call takes
ACCURACY_SAMPLES = 16  # images of the embedded default set for the plot's top-1 agreement
NOISY_RATIO = 1.5  # p90 over p50 above this: the machine was busy, the row is flagged
NOISY_ADVICE = ("rerun `deploy bench DIR --duration-s 20` on a quiet machine (close other work; on a VM, "
                "another tenant may be using the cores)")
METHOD = {
    "latency": "each runner in its own worker process, one request at a time; the workers take turns in slices of "
               "slice_s, only one computing at a time, and a worker hands back only once its process has gone "
               "quiet; until each has duration_s of timed calls, after a discarded warm-up done the same way",
    "throughput": "each runner in its own worker process, as many requests in flight as the runtime serves best "
                  "(OpenVINO THROUGHPUT hint + async infer queue, ONNX Runtime concurrent runs, eager batched "
                  "calls); the workers take turns in slices of slice_s, one at a time",
}
PLOT_WHAT = {"latency": "p50 latency against agreement", "throughput": "images/s against agreement"}


@dataclass(frozen=True)
class Latency:
    """Wall-clock seconds of each call of one function; summaries are computed from them on demand."""

    times_s: tuple[float, ...]

    @classmethod
    def measure(cls, fn: Callable[[], object], warmup: int, iters: int,
                clock: Callable[[], float] = time.perf_counter) -> "Latency":
        """`warmup` untimed calls, then `iters` timed ones."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return cls(tuple(times))

    @property
    def calls(self) -> int:
        return len(self.times_s)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.times_s), q)) * 1e3

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.times_s)) * 1e3

    def throughput(self, batch_size: int) -> float:
        """Images per second, one call after another: all images over all the time the calls took."""
        return batch_size * self.calls / float(np.sum(self.times_s))

    def summary(self, batch_size: int) -> dict[str, float | int]:
        return {"p50_ms": self.p50_ms, "p90_ms": self.percentile_ms(90), "p99_ms": self.percentile_ms(99),
                "mean_ms": self.mean_ms, "throughput": self.throughput(batch_size), "calls": self.calls}


# --------------------------------------------------------------------------- the run


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,8' -> (1, 8): positive, distinct, in the order given."""
    sizes: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"--batch-sizes takes positive integers separated by commas, e.g. 1,8; got {text!r}.")
        if int(part) not in sizes:
            sizes.append(int(part))
    if not sizes:
        raise UsageError(f"--batch-sizes takes positive integers separated by commas, e.g. 1,8; got {text!r}.")
    return tuple(sizes)


@dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int | None = None
    warmup_s: float = 1.0
    duration_s: float = 5.0
    slice_s: float = SLICE_S
    mode: Mode = "latency"
    streams: int | None = None  # throughput mode: None lets each runtime choose


@dataclass
class BenchRequest:
    folder: str | Path
    backends: str | None = None  # comma-separated; None = every artifact in the manifest
    settings: BenchSettings = BenchSettings()
    allow_pickle: bool = False


@dataclass
class Bench:
    document: dict[str, Any]
    markdown: str
    plot: Path


def bench_inputs(images: np.ndarray, batch_size: int) -> np.ndarray:
    """A contiguous batch of `batch_size` images, repeating the given ones in order when there are fewer."""
    return np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])), dtype=np.float32)


def run_bench(req: BenchRequest, console: Console = SILENT) -> Bench:
    """`deploy bench DIR`: open the export from disk and time eager and every selected row."""
    manifest = Manifest.load(req.folder)
    sizes = req.settings.batch_sizes
    require_export_memory(manifest, max(sizes), f"deploy bench --batch-sizes {','.join(map(str, sizes))}")
    export = open_export(req.folder, manifest=manifest, allow_pickle=req.allow_pickle, console=console)
    return bench_export(export, select_rows(export.manifest, req.backends), req.settings, console)


def agreement_of(export: ExportHandle, rows: Sequence[Artifact], images: np.ndarray, threads: int | None,
                 console: Console) -> tuple[dict[str, Drift], list[Opened], list[dict[str, str]]]:
    """Top-1 agreement with eager of every row on a few images, in this process (before any timing)."""
    options = RunnerOptions(threads=threads)
    eager = export.eager_runner(options)
    opened, skipped = open_rows(export.folder, rows, options, console)
    try:
        if not opened and rows:
            raise nothing_runs_error(rows, skipped)
        logits = run_all({o.key: o.runner for o in (eager, *opened)}, images, 8)
    finally:
        close_all([eager, *opened])
    return {o.key: Drift.between(logits[eager.key], logits[o.key]) for o in (eager, *opened)}, [eager, *opened], skipped


def worker_specs(export: ExportHandle, opened: Sequence[Opened], threads: int | None) -> list[WorkerSpec]:
    from partialnet.factory import portable  # a user's model unpickles in the worker too

    options = RunnerOptions(threads=threads)
    specs = []
    for o in opened:
        if o.artifact is None:
            specs.append(WorkerSpec(o.key, options, model=portable(export.model), input_size=export.manifest.input_size))
        else:
            specs.append(WorkerSpec(o.key, options, folder=str(export.folder), artifact=o.artifact.to_dict()))
    return specs


def bench_export(export: ExportHandle, rows: Sequence[Artifact], settings: BenchSettings, console: Console) -> Bench:
    """Time eager and every row, each in its own worker process, round-robin; write bench.json, bench.md and
    bench.png into the export's folder."""
    from .plot import PlotPoint, latency_agreement_png

    manifest = export.manifest
    threads = check_threads(settings.threads, console)
    settings = replace(settings, threads=threads)
    pp = Preprocess.from_dict(manifest.preprocess)
    images = default_images(ACCURACY_SAMPLES, pp, seed=0)
    agreement, opened, skipped = agreement_of(export, rows, images.images, threads, console)

    def skip(spec: WorkerSpec, reason: str) -> None:
        skipped.append({"key": spec.key, "backend": spec.key.split("/")[0], "precision": spec.key.split("/")[-1],
                        "reason": reason})
        console(f"skipped {spec.key}: {reason}")

    console(f"bench: {len(opened)} runners x {len(settings.batch_sizes)} batch size(s), {settings.mode}, each in its "
            f"own process, one at a time; about {len(opened) * len(settings.batch_sizes) * (settings.warmup_s + settings.duration_s):.0f} s")
    workers = open_workers(worker_specs(export, opened, threads), settings.mode, settings.streams, on_skip=skip)
    try:
        send_inputs(workers, {bs: bench_inputs(images.images, bs) for bs in settings.batch_sizes})
        with console.seconds_bar(len(workers) * len(settings.batch_sizes) * settings.duration_s, "timing") as progress:
            timed = round_robin(workers, settings.batch_sizes, mode=settings.mode, warmup_s=settings.warmup_s,
                                duration_s=settings.duration_s, slice_s=settings.slice_s, min_calls=MIN_CALLS,
                                progress=progress)
        info = {w.key: w.info for w in workers}
    finally:
        close_workers(workers)

    ran = [o for o in opened if o.key in info]
    table = bench_rows(ran, settings, timed, agreement, info)
    noisy = [f"{r['key']} batch {r['batch_size']}" for r in table if r["noisy"]]
    report = Report(title=f"{manifest.variant} benchmark ({settings.mode})")
    shown = export.shown_as
    report.section("export", {"folder": str(shown), "variant": manifest.variant, "input_size": manifest.input_size})
    report.section("settings", {
        "mode": settings.mode, "batch_sizes": list(settings.batch_sizes), "threads": threads,
        "streams": settings.streams, "warmup_s": settings.warmup_s, "duration_s": settings.duration_s,
        "slice_s": settings.slice_s, "min_calls": MIN_CALLS, "method": METHOD[settings.mode],
    })
    report.section("rows", table)
    report.section("noise", {"noisy": noisy, "rule": f"p90/p50 above {NOISY_RATIO:g}",
                             "advice": NOISY_ADVICE if noisy else None})
    report.section("agreement_set", {"source": images.source, "samples": len(images),
                                     "what": "top-1 agreement with eager, not accuracy on labelled data"})
    report.section("skipped", skipped)
    doc = report.to_document()
    for key in ("gates", "passed", "failures"):
        doc.pop(key)
    doc["files"] = {"json": str(shown / BENCH[0]), "markdown": str(shown / BENCH[1]), "plot": str(shown / BENCH[2])}
    if noisy:
        console(f"note: noisy run ({', '.join(noisy)}: p90/p50 above {NOISY_RATIO:g}); {NOISY_ADVICE}")

    value = "p50_ms" if settings.mode == "latency" else "images_per_s"
    points = [PlotPoint(f"{r['backend']} {r['precision']}", r[value], r["top1_agreement"], r["batch_size"])
              for r in table]
    plot = latency_agreement_png(points, export.folder / BENCH[2], mode=settings.mode,
                                 title=f"{manifest.variant} at {manifest.input_size} px: {PLOT_WHAT[settings.mode]}",
                                 note=f"{doc['environment']['cpu']}; agreement on {len(images)} default images")
    markdown = bench_markdown(doc)
    atomic_write_json(export.folder / BENCH[0], doc, force=True)
    atomic_write_text(export.folder / BENCH[1], markdown, force=True)
    console(f"wrote {shown / BENCH[0]}, {shown / BENCH[1]} and {shown / BENCH[2]}")
    return Bench(doc, markdown, plot)


def check_threads(threads: int | None, console: Console) -> int | None:
    """--threads above the usable cores would oversubscribe them and publish a meaningless figure: capped, said."""
    cores = usable_cores()
    if threads is not None and threads > cores:
        console.warn(f"--threads {threads} is more than the {cores} usable cores; timing with {cores}")
        return cores
    return threads


def bench_rows(runners: Sequence[Opened], settings: BenchSettings, timed: Mapping[tuple[str, int], Timed],
               agreement: Mapping[str, Drift], info: Mapping[str, WorkerInfo]) -> list[dict[str, Any]]:
    """One row per (runner, batch size), eager first in each batch size. Speed-up against eager: p50 latency over
    p50 latency (latency mode), images/s over images/s (throughput mode)."""
    out = []
    for bs in settings.batch_sizes:
        base = None
        for o in runners:
            t = timed[(o.key, bs)]
            lat = Latency(tuple(t.times_s))
            row: dict[str, Any] = {"key": o.key, "role": "reference" if o.artifact is None else "artifact",
                                   "backend": o.backend, "precision": o.precision, "batch_size": bs,
                                   **lat.summary(bs)}
            if settings.mode == "throughput":
                completed = sum(s.completed for s in t.samples)
                elapsed = sum(s.elapsed_s for s in t.samples)
                row["images_per_s"] = completed * bs / elapsed
                row["throughput"] = row["images_per_s"]
                row["requests"] = completed
            else:
                row["images_per_s"] = row["throughput"]
            figure = row["p50_ms"] if settings.mode == "latency" else 1.0 / row["images_per_s"]
            base = figure if base is None else base
            w = info[o.key]
            row.update({
                "speedup_vs_eager": base / figure,
                "noisy": row["p90_ms"] / row["p50_ms"] > NOISY_RATIO,
                "top1_agreement": agreement[o.key].top1_agreement,
                "max_abs_logit_error": agreement[o.key].max_abs_logit_error,
                "mean_abs_logit_error": agreement[o.key].mean_abs_logit_error,
                "agreement_samples": agreement[o.key].samples,
                "ref_margin_median": agreement[o.key].ref_margin_median,
                "flipped_margin_max": agreement[o.key].flipped_margin_max,
                "runner": w.runner, "threads": w.threads, "affinity": w.affinity, "pid": w.pid,
                "streams": w.streams if settings.mode == "throughput" else 1,
                "performance_hint": w.options.get("performance_hint"),
                "settle_ms_median": float(np.median(t.settle_s)) * 1e3 if t.settle_s else 0.0,
                "slices": len(t.slices),
                "path": o.artifact.path if o.artifact else None,
            })
            out.append(row)
    return out


# --------------------------------------------------------------------------- rendering


BENCH_HEAD = ("backend", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "speed-up vs eager",
              "top-1 agreement", "calls", "threads", "streams", "noise")


def _cells(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["backend"], r["precision"], str(r["batch_size"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
            f"{r['p99_ms']:.3f}", f"{r['images_per_s']:.1f}", f"{r['speedup_vs_eager']:.2f}x",
            f"{r['top1_agreement']:.4f}", str(r["calls"]), "default" if r["threads"] is None else str(r["threads"]),
            str(r["streams"]), "NOISY" if r["noisy"] else "ok")


def format_bench(doc: dict[str, Any]) -> str:
    """The readable table printed on stdout without --json."""
    rows = [BENCH_HEAD, *(_cells(r) for r in doc["rows"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(BENCH_HEAD))]
    lines = [f"{doc['export']['variant']} at {doc['export']['input_size']} px on {doc['environment']['cpu']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += _disagreements(doc["rows"])
    if doc["noise"]["noisy"]:
        lines.append(f"noisy: {', '.join(doc['noise']['noisy'])} ({doc['noise']['rule']}); {doc['noise']['advice']}")
    lines += [f"skipped {s['key']}: {s['reason']}" for s in doc["skipped"]]
    return "\n".join(lines)


def _disagreements(rows: Sequence[dict[str, Any]]) -> list[str]:
    return disagreement_notes(rows, samples_key="agreement_samples")


def bench_markdown(doc: dict[str, Any]) -> str:
    """bench.md: the table, how it was measured, the plot, and the machine."""
    s, env = doc["settings"], doc["environment"]
    notes = _disagreements(doc["rows"])
    ex = doc["export"]
    lines = [f"# {doc['title']}", "", f"Created {doc['created']}. `{ex['folder']}`: {ex['variant']} "
             f"at {ex['input_size']} px.", "",
             f"Mode: {s['mode']}. Method: {s['method']} (slices of {s['slice_s']:g} s, {s['duration_s']:g} s timed "
             f"and {s['warmup_s']:g} s of warm-up per runner and batch size). Latency is per request (one batch); "
             f"images/s is images completed over the time taken; speed-up is eager's p50 over the row's p50 "
             f"(latency) or the row's images/s over eager's (throughput), at the same batch size. A row is NOISY "
             f"when {doc['noise']['rule']}.", "",
             "| " + " | ".join(BENCH_HEAD) + " |", "|" + "---|" * len(BENCH_HEAD)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in doc["rows"]]
    lines += ["", f"Top-1 agreement with eager on the {doc['agreement_set']['source']}: agreement, not accuracy on "
              f"labelled data (`deploy validate --data DIR` measures that).", "",
              *(f"- {n}" for n in notes), *([""] if notes else []),
              *([f"**Noisy run**: {', '.join(doc['noise']['noisy'])}; {doc['noise']['advice']}.", ""]
                if doc["noise"]["noisy"] else []),
              "![latency or throughput against top-1 agreement](bench.png)", "",
              "| runner | process | threads | CPUs it may use | OpenVINO hint | median settle ms |", "|---|---|---|---|---|---|",
              *(f"| {r['key']} | {r['pid']} | {r['threads'] if r['threads'] is not None else 'default'} | "
                f"{_cpus(r['affinity'])} | {r['performance_hint'] or '-'} | {r['settle_ms_median']:.1f} |"
                for r in doc["rows"] if r["batch_size"] == doc["rows"][0]["batch_size"]), ""]
    if doc["skipped"]:
        lines += ["## Skipped", "", *(f"- {x['key']}: {x['reason']}" for x in doc["skipped"]), ""]
    lines += ["## Environment", "", f"- CPU: {env['cpu']} ({env['usable_cpus']} usable of {env['logical_cpus']})",
              f"- ISA extensions: {isa_summary(env)}",
              f"- threads: {s['threads'] or 'library defaults'} (torch: {env['torch_threads']})",
              f"- GPU: {', '.join(env['gpu']) if env['gpu'] else 'none'}", f"- platform: {env['platform']}",
              "- libraries: " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items()), ""]
    return "\n".join(lines)


def _cpus(affinity: list[int] | None) -> str:
    return "unknown" if affinity is None else ",".join(map(str, affinity))
