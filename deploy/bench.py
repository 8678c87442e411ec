"""`deploy bench`: latency of the eager model and every artifact, measured interleaved in one run.

Runners never time themselves. `measure_interleaved` calls every (runner, batch size) round-robin in short
slices, so that load from other processes on the machine falls on all of them alike, and returns `Latency`:
plain per-call times. Rows, Markdown, the plot and the files are made from that data afterwards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence, TypeVar

import numpy as np

from calibration.sources import default_images
from export.manifest import Manifest
from partialnet.errors import UsageError
from partialnet.files import atomic_write_json, atomic_write_text
from partialnet.resources import config_from_dict, require_memory
from partialnet.variants import Preprocess
from runtimes.base import INPUT_NAME

from .drift import Drift, disagreement_notes
from .predict import run_batched
from .report import Report
from .report import isa_summary, machine_fingerprint
from .validate import (Log, Opened, close_all, nothing_runs_error, open_eager,
                       open_rows, select_rows)

SLICE_S = 0.1  # one turn of a runner in the round-robin
MIN_CALLS = 5  # per (runner, batch size), however long a call takes
ACCURACY_SAMPLES = 16  # images of the embedded default set for the plot's top-1 agreement

K = TypeVar("K", bound=Hashable)


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


def measure_interleaved(
    calls: Mapping[K, Callable[[], object]],
    *,
    warmup_s: float,
    duration_s: float,
    slice_s: float = SLICE_S,
    min_calls: int = MIN_CALLS,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[float], None] | None = None,
) -> dict[K, Latency]:
    """Time every function round-robin in slices of `slice_s` until each has `duration_s` of timed calls.

    A warm-up of `warmup_s` per function (at least one call each) runs the same way first and is discarded.
    Every round starts with the next function in turn, and all functions keep taking turns until the last one is
    done, so the load from other processes falls on each of them alike. `progress` gets the seconds done so far
    (each function counted up to `duration_s`) after every round.
    """
    keys = list(calls)
    if not keys:
        return {}
    _rounds(calls, keys, warmup_s, 1, slice_s, clock, None, None)
    times: dict[K, list[float]] = {k: [] for k in keys}
    _rounds(calls, keys, duration_s, min_calls, slice_s, clock, times, progress)
    return {k: Latency(tuple(v)) for k, v in times.items()}


def _rounds(calls, keys, budget_s, min_calls, slice_s, clock, times, progress) -> None:
    spent = {k: 0.0 for k in keys}
    count = {k: 0 for k in keys}
    turn = 0
    while any(spent[k] < budget_s or count[k] < min_calls for k in keys):
        start = turn % len(keys)
        for k in keys[start:] + keys[:start]:
            fn = calls[k]
            slice_end = clock() + slice_s
            while True:
                t0 = clock()
                fn()
                t1 = clock()
                spent[k] += t1 - t0
                count[k] += 1
                if times is not None:
                    times[k].append(t1 - t0)
                if t1 >= slice_end:
                    break
        turn += 1
        if progress is not None:
            progress(sum(min(s, budget_s) for s in spent.values()))


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


@dataclass
class BenchRequest:
    folder: str | Path
    backends: str | None = None  # comma-separated; None = every artifact in the manifest
    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int | None = None
    warmup_s: float = 1.0
    duration_s: float = 5.0
    slice_s: float = SLICE_S
    allow_pickle: bool = False
    shown_as: str | None = None  # the folder's name in reports, when it is benched before being renamed into place


@dataclass
class Bench:
    document: dict[str, Any]
    markdown: str
    plot: Path


def bench_inputs(images: np.ndarray, batch_size: int) -> np.ndarray:
    """A contiguous batch of `batch_size` images, repeating the given ones in order when there are fewer."""
    return np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])), dtype=np.float32)


def runner_threads(o: Opened) -> int | None:
    """The threads a runner computes with, as it reports them (eager: torch's intra-op pool)."""
    if o.backend == "eager":
        import torch

        return torch.get_num_threads()
    return getattr(o.runner, "options", {}).get("threads")


def run_bench(req: BenchRequest, log: Log = print, show_progress: bool = False) -> Bench:
    """Time eager and every selected artifact interleaved; write DIR/bench.json, bench.md and bench.png."""
    from .plot import PlotPoint, latency_agreement_png

    folder = Path(req.folder)
    manifest = Manifest.load(folder)
    require_memory(config_from_dict(manifest.architecture), manifest.input_size, max(req.batch_sizes),
                   f"deploy bench --batch-sizes {','.join(map(str, req.batch_sizes))}")
    rows = select_rows(manifest, req.backends)
    pp = Preprocess.from_dict(manifest.preprocess)
    images = default_images(ACCURACY_SAMPLES, pp, seed=0)

    _, eager = open_eager(manifest, req.threads, req.allow_pickle, log)
    opened, skipped = open_rows(folder, manifest, rows, req.threads, log, for_timing=True)
    runners = [eager, *opened]
    try:
        if not opened and rows:
            raise nothing_runs_error(rows, skipped)
        ref = run_batched(eager.runner, images.images, 8)
        agreement = {o.key: Drift.between(ref, run_batched(o.runner, images.images, 8)) for o in runners}
        batches = {bs: bench_inputs(images.images, bs) for bs in req.batch_sizes}
        calls = {(o.key, bs): _call(o, batches[bs]) for bs in req.batch_sizes for o in runners}
        log(f"bench: {len(runners)} runners x {len(req.batch_sizes)} batch size(s), interleaved, "
            f"about {len(calls) * (req.warmup_s + req.duration_s):.0f} s")
        latencies = _measure(calls, req, show_progress)
        threads = {o.key: runner_threads(o) for o in runners}
    finally:
        close_all(runners)

    table = bench_rows(runners, req.batch_sizes, latencies, agreement, threads)
    report = Report(title=f"{manifest.variant} benchmark")
    shown = Path(req.shown_as) if req.shown_as else folder
    report.section("export", {"folder": str(shown), "variant": manifest.variant, "input_size": manifest.input_size})
    report.section("settings", {
        "batch_sizes": list(req.batch_sizes), "threads": req.threads, "warmup_s": req.warmup_s,
        "duration_s": req.duration_s, "slice_s": req.slice_s, "min_calls": MIN_CALLS,
        "method": "interleaved: every (runner, batch size) in turn, in slices of slice_s, until each has duration_s "
                  "of timed calls; warm-up the same way first, discarded",
    })
    report.section("rows", table)
    report.section("agreement_set", {"source": images.source, "samples": len(images),
                                     "what": "top-1 agreement with eager, not accuracy on labelled data"})
    report.section("skipped", skipped)
    report.environment = machine_fingerprint()
    doc = report.to_dict()
    for key in ("manifest", "gates", "passed"):
        doc.pop(key)
    doc.update(doc.pop("sections"))
    doc["environment"] = doc.pop("environment")
    doc["files"] = {"json": str(shown / "bench.json"), "markdown": str(shown / "bench.md"),
                    "plot": str(shown / "bench.png")}

    points = [PlotPoint(f"{r['backend']} {r['precision']}", r["p50_ms"], r["top1_agreement"], r["batch_size"])
              for r in table]
    plot = latency_agreement_png(points, folder / "bench.png",
                                 title=f"{manifest.variant} at {manifest.input_size} px: p50 latency against agreement",
                                 note=f"{doc['environment']['cpu']}; agreement on {len(images)} default images")
    markdown = bench_markdown(doc)
    atomic_write_json(folder / "bench.json", doc, force=True)
    atomic_write_text(folder / "bench.md", markdown, force=True)
    log(f"wrote {shown / 'bench.json'}, {shown / 'bench.md'} and {shown / plot.name}")
    return Bench(doc, markdown, plot)


def _call(o: Opened, x: np.ndarray) -> Callable[[], object]:
    feeds = {INPUT_NAME: x}
    run = o.runner.run
    return lambda: run(feeds)


def _measure(calls, req: BenchRequest, show_progress: bool):
    if not show_progress:
        return measure_interleaved(calls, warmup_s=req.warmup_s, duration_s=req.duration_s, slice_s=req.slice_s)
    from tqdm import tqdm

    total = len(calls) * req.duration_s
    with tqdm(total=round(total, 1), desc="timing", unit="s", leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s") as bar:
        def progress(done: float) -> None:
            bar.n = min(round(done, 1), bar.total)
            bar.refresh()

        return measure_interleaved(calls, warmup_s=req.warmup_s, duration_s=req.duration_s, slice_s=req.slice_s,
                                   progress=progress)


def bench_rows(runners: Sequence[Opened], batch_sizes: Sequence[int], latencies: Mapping[tuple[str, int], Latency],
               agreement: Mapping[str, Drift], threads: Mapping[str, int | None]) -> list[dict[str, Any]]:
    """One row per (runner, batch size), eager first in each batch size; speed-up = eager p50 / this p50."""
    out = []
    for bs in batch_sizes:
        eager_p50 = latencies[("eager", bs)].p50_ms
        for o in runners:
            lat = latencies[(o.key, bs)]
            out.append({
                "backend": o.backend, "precision": o.precision, "batch_size": bs, **lat.summary(bs),
                "speedup_vs_eager": eager_p50 / lat.p50_ms,
                "top1_agreement": agreement[o.key].top1_agreement,
                "max_abs_logit_error": agreement[o.key].max_abs_logit_error,
                "mean_abs_logit_error": agreement[o.key].mean_abs_logit_error,
                "agreement_samples": agreement[o.key].samples,
                "ref_margin_median": agreement[o.key].ref_margin_median,
                "flipped_margin_max": agreement[o.key].flipped_margin_max,
                "runner": o.runner.name, "threads": threads[o.key],
                "path": o.artifact.path if o.artifact else None,
            })
    return out


# --------------------------------------------------------------------------- rendering


BENCH_HEAD = ("backend", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "speed-up vs eager",
              "top-1 agreement", "calls", "threads")


def _cells(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["backend"], r["precision"], str(r["batch_size"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
            f"{r['p99_ms']:.3f}", f"{r['throughput']:.1f}", f"{r['speedup_vs_eager']:.2f}x",
            f"{r['top1_agreement']:.4f}", str(r["calls"]), "default" if r["threads"] is None else str(r["threads"]))


def format_bench(doc: dict[str, Any]) -> str:
    """The readable table printed on stdout without --json."""
    rows = [BENCH_HEAD, *(_cells(r) for r in doc["rows"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(BENCH_HEAD))]
    lines = [f"{doc['export']['variant']} at {doc['export']['input_size']} px on {doc['environment']['cpu']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += _disagreements(doc["rows"])
    lines += [f"skipped {s['backend']}/{s['precision']}: {s['reason']}" for s in doc["skipped"]]
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
             f"Interleaved in one run: every (runner, batch size) takes turns in slices of {s['slice_s']:g} s until "
             f"each has {s['duration_s']:g} s of timed calls (at least {s['min_calls']}), after {s['warmup_s']:g} s of "
             f"warm-up each. Latency is per call (one batch); images/s is batch size x calls / time; speed-up is "
             f"eager's p50 over the row's p50 at the same batch size.", "",
             "| " + " | ".join(BENCH_HEAD) + " |", "|" + "---|" * len(BENCH_HEAD)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in doc["rows"]]
    lines += ["", f"Top-1 agreement with eager on the {doc['agreement_set']['source']}: agreement, not accuracy on "
              f"labelled data (`deploy validate --data DIR` measures that).", "",
              *(f"- {n}" for n in notes), *([""] if notes else []),
              "![p50 latency against top-1 agreement](bench.png)", ""]
    if doc["skipped"]:
        lines += ["## Skipped", "", *(f"- {x['backend']}/{x['precision']}: {x['reason']}" for x in doc["skipped"]), ""]
    lines += ["## Environment", "", f"- CPU: {env['cpu']} ({env['usable_cpus']} usable of {env['logical_cpus']})",
              f"- ISA extensions: {isa_summary(env)}",
              f"- threads: {s['threads'] or 'library defaults'} (torch: {env['torch_threads']})",
              f"- GPU: {', '.join(env['gpu']) if env['gpu'] else 'none'}", f"- platform: {env['platform']}",
              "- libraries: " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items()), ""]
    return "\n".join(lines)
