"""Process-isolated timing: every runner (eager included) in a worker process of its own, one computing at a time.

Why: with every runner of three frameworks in one process on two cores, torch's OpenMP pool, ONNX Runtime's
spinning intra-op pool and each compiled OpenVINO model's pinned workers outlive their turn and take the cores
from the next runner (benchmarks/INTERFERENCE.md has the measurements). So each runner is opened in its own
process, configured as a user deploys it (ONNX Runtime with its default spinning, OpenVINO with the LATENCY hint,
torch with its thread count and inference_mode), and the parent keeps the round-robin across workers so that drift
of the machine falls on all alike: it hands one worker a slice, waits for its times, and only then the next. A
worker answers only once its own process has gone quiet (its CPU time stops growing: `wait_quiet`), so a pool that
keeps spinning after the last call costs that worker's settle time, never the next worker's latency.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from partialnet.errors import DeployError

from .backends import RunnerOptions

Mode = Literal["latency", "throughput"]
QUIET_WINDOW_S = 0.005  # the worker's process is quiet when it used less than QUIET_SHARE of a core over this
QUIET_SHARE = 0.05
QUIET_MAX_S = 1.0  # a pool that never parks is reported (settle_s), not waited for forever
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker opens its runner: an artifact row of an export folder, or the eager model itself."""

    key: str
    options: RunnerOptions
    folder: str | None = None
    artifact: dict[str, Any] | None = None  # Artifact.to_dict()
    model: Any = None  # the eager torch module (sent to the worker)
    input_size: int | None = None
    # tests: a factory that makes the runner in the worker (a picklable top-level callable)
    factory: Callable[[], Any] | None = None


@dataclass
class SliceResult:
    times_s: list[float]
    settle_s: float  # how long the worker's process took to go quiet after its last call
    started: float  # time.monotonic() at the slice's first call (system-wide clock: comparable across processes)
    ended: float


@dataclass
class WorkerInfo:
    key: str
    pid: int
    runner: str
    threads: int | None
    affinity: list[int] | None
    options: dict[str, Any] = field(default_factory=dict)
    streams: int | None = None


def wait_quiet(window_s: float = QUIET_WINDOW_S, share: float = QUIET_SHARE, max_s: float = QUIET_MAX_S) -> float:
    """Sleep until this process (all its threads) used under `share` of a core over `window_s`; returns the wait."""
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(window_s)
        if time.process_time() - cpu0 < share * (time.monotonic() - wall0):
            break
    return time.monotonic() - start


def _open(spec: WorkerSpec, mode: Mode, streams: int | None):
    """The runner (latency) or the streams object (throughput) in the worker."""
    from pathlib import Path

    from export.manifest import Artifact

    from . import backends
    from .backends import EAGER

    if spec.factory is not None:
        return spec.factory()
    if spec.artifact is None:
        if mode == "throughput":
            return EAGER.open_model_streams(spec.model, spec.input_size, spec.options, streams)
        return EAGER.open_model(spec.model, spec.input_size, spec.options)
    art = Artifact.from_dict(spec.artifact)
    if mode == "throughput":
        return backends.open_row_streams(Path(spec.folder or "."), art, spec.options, streams)
    return backends.open_row(Path(spec.folder or "."), art, spec.options)


def _worker(conn, spec: WorkerSpec, mode: Mode, streams: int | None) -> None:
    """A worker's life: open, report, then answer slices until told to close. Idle, it blocks on the pipe."""
    try:
        target = _open(spec, mode, streams)
        opts = dict(getattr(target, "options", {}))
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        conn.send(("ready", WorkerInfo(spec.key, os.getpid(), getattr(target, "name", spec.key), opts.get("threads"),
                                       affinity, opts, getattr(target, "streams", None))))
    except BaseException as e:  # reported to the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}" if not isinstance(e, DeployError) else str(e),
                   isinstance(e, DeployError)))
        return
    inputs: dict[int, np.ndarray] = {}
    quiet_max = QUIET_MAX_S
    while True:
        msg = conn.recv()
        kind = msg[0]
        try:
            if kind == "close":
                target.close()
                conn.send(("closed",))
                return
            if kind == "inputs":
                inputs = msg[1]
                conn.send(("ok",))
            elif kind == "settle":  # the longest wait for quiet after a slice (0: none, for the method's tests)
                quiet_max = msg[1]
                conn.send(("ok",))
            elif kind == "latency":
                _, bs, budget_s, min_calls = msg
                conn.send(("slice", _latency_slice(target, inputs[bs], budget_s, min_calls, quiet_max)))
            elif kind == "throughput":
                _, bs, budget_s = msg
                started = time.monotonic()
                sample = target.run_for(inputs[bs], budget_s)
                ended = time.monotonic()
                conn.send(("sample", sample, wait_quiet(max_s=quiet_max), started, ended))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}", isinstance(e, DeployError)))


def _latency_slice(runner, x: np.ndarray, budget_s: float, min_calls: int, quiet_max: float) -> SliceResult:
    from runtimes.base import INPUT_NAME

    feeds = {INPUT_NAME: x}
    run = runner.run
    times: list[float] = []
    started = time.monotonic()
    end = time.perf_counter() + budget_s
    while True:
        t0 = time.perf_counter()
        run(feeds)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 >= end and len(times) >= min_calls:
            break
    ended = time.monotonic()
    return SliceResult(times, wait_quiet(max_s=quiet_max), started, ended)


class Worker:
    """A runner in its own process, driven over a pipe."""

    def __init__(self, spec: WorkerSpec, mode: Mode = "latency", streams: int | None = None):
        ctx = mp.get_context("spawn")  # a fresh interpreter: no thread pool inherited from the parent
        self.key = spec.key
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, spec, mode, streams), daemon=True,
                                 name=f"deploy-bench-{spec.key}")
        self._proc.start()
        child.close()
        reply = self._recv(READY_TIMEOUT_S)
        if reply[0] == "error":
            self.close()
            raise WorkerError(self.key, reply[1], reply[2])
        self.info: WorkerInfo = reply[1]

    def _recv(self, timeout: float | None = None) -> tuple:
        if not self._conn.poll(timeout):
            self.close()
            raise DeployError(f"the benchmark worker for {self.key} did not answer within {timeout:.0f} s; rerun "
                              f"'deploy bench' (a worker is stopped after that long).")
        try:
            return self._conn.recv()
        except EOFError:
            code = self._proc.exitcode
            raise DeployError(f"the benchmark worker for {self.key} died (exit code {code}); rerun with --traceback "
                              f"or bench that backend alone with --backends.") from None

    def ask(self, *msg: Any, timeout: float | None = None) -> tuple:
        self._conn.send(msg)
        reply = self._recv(timeout)
        if reply[0] == "error":
            raise WorkerError(self.key, reply[1], reply[2])
        return reply

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("close",))
                if self._conn.poll(10):
                    self._conn.recv()
            except (OSError, EOFError):
                pass
            self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()


class WorkerError(DeployError):
    """A worker could not open or run its runner."""

    def __init__(self, key: str, message: str, expected: bool):
        super().__init__(message if expected else f"{key}: {message}")
        self.key = key
        self.expected = expected  # a DeployError in the worker (e.g. the backend cannot run here)


def open_workers(specs: Sequence[WorkerSpec], mode: Mode = "latency", streams: int | None = None,
                 on_skip: Callable[[WorkerSpec, str], None] | None = None) -> list[Worker]:
    """Start one worker per spec, one after another (each opens and compiles alone). A worker whose runner cannot
    be opened here is skipped through `on_skip` (if given) or raises."""
    workers: list[Worker] = []
    try:
        for spec in specs:
            try:
                workers.append(Worker(spec, mode, streams))
            except WorkerError as e:
                if on_skip is None or not e.expected:
                    raise
                on_skip(spec, str(e))
    except BaseException:
        close_workers(workers)
        raise
    return workers


def close_workers(workers: Sequence[Worker]) -> None:
    for w in workers:
        w.close()


def send_inputs(workers: Sequence[Worker], inputs: Mapping[int, np.ndarray]) -> None:
    for w in workers:
        w.ask("inputs", dict(inputs))


@dataclass
class Timed:
    """What the round-robin measured for one (worker, batch size)."""

    times_s: list[float] = field(default_factory=list)
    settle_s: list[float] = field(default_factory=list)
    slices: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each timed slice, monotonic
    samples: list[Any] = field(default_factory=list)  # throughput: runtimes.throughput.Sample per slice


def round_robin(workers: Sequence[Worker], batch_sizes: Sequence[int], *, mode: Mode, warmup_s: float,
                duration_s: float, slice_s: float, min_calls: int,
                progress: Callable[[float], None] | None = None) -> dict[tuple[str, int], Timed]:
    """Every (worker, batch size) in turn, one slice at a time, until each has `duration_s` of timed work.

    The warm-up runs the same way first (at least one call each) and is discarded. Every round starts with the next
    pair in turn, so slow drift of the machine falls on all of them alike.
    """
    pairs = [(w, bs) for bs in batch_sizes for w in workers]
    _rounds(pairs, mode, warmup_s, 1, slice_s, None, None)
    out = {(w.key, bs): Timed() for w, bs in pairs}
    _rounds(pairs, mode, duration_s, min_calls, slice_s, out, progress)
    return out


def _rounds(pairs, mode: Mode, budget_s: float, min_calls: int, slice_s: float, out, progress) -> None:
    spent = {(w.key, bs): 0.0 for w, bs in pairs}
    calls = {(w.key, bs): 0 for w, bs in pairs}
    turn = 0
    while any(spent[k] < budget_s or calls[k] < min_calls for k in spent):
        start = turn % len(pairs)
        for w, bs in pairs[start:] + pairs[:start]:
            key = (w.key, bs)
            if spent[key] >= budget_s and calls[key] >= min_calls:
                continue
            if mode == "latency":
                result: SliceResult = w.ask("latency", bs, slice_s, 1)[1]
                spent[key] += sum(result.times_s)
                calls[key] += len(result.times_s)
                if out is not None:
                    t = out[key]
                    t.times_s += result.times_s
                    t.settle_s.append(result.settle_s)
                    t.slices.append((result.started, result.ended))
            else:
                _, sample, settle, started, ended = w.ask("throughput", bs, slice_s)
                spent[key] += sample.elapsed_s
                calls[key] += sample.completed
                if out is not None:
                    t = out[key]
                    t.samples.append(sample)
                    t.times_s += list(sample.latencies_s)
                    t.settle_s.append(settle)
                    t.slices.append((started, ended))
        turn += 1
        if progress is not None:
            progress(sum(min(s, budget_s) for s in spent.values()))
