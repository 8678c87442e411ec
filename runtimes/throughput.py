"""Many requests at once: a runtime's own way of keeping every core busy, timed over a fixed stretch of time.

`Streams` is the throughput counterpart of a Runner: `run_for(x, seconds)` keeps `streams` requests in flight on
the same input until `seconds` have passed and returns a `Sample` of what completed. OpenVINO brings its own (an
AsyncInferQueue under the THROUGHPUT hint, runtimes.ov); `ThreadedStreams` serves any runner whose `run` releases
the GIL (ONNX Runtime's session.run, a torch forward): one thread per stream.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from .base import INPUT_NAME


@dataclass(frozen=True)
class Sample:
    """Requests completed in a stretch of wall time, and each one's latency (seconds)."""

    completed: int  # requests (each one batch of `batch_size` images)
    batch_size: int
    elapsed_s: float
    latencies_s: tuple[float, ...]

    @property
    def images_per_s(self) -> float:
        return self.completed * self.batch_size / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Streams(Protocol):
    streams: int
    options: dict[str, Any]

    def run_for(self, x: np.ndarray, seconds: float) -> Sample: ...

    def close(self) -> None: ...


class ThreadedStreams:
    """`streams` threads, each calling its own `call(feeds)` back to back."""

    def __init__(self, calls: list[Callable[[dict[str, np.ndarray]], object]], options: dict[str, Any],
                 close: Callable[[], None] = lambda: None):
        if not calls:
            raise ValueError("need at least one stream")
        self._calls, self._close = calls, close
        self.streams = len(calls)
        self.options = {**options, "streams": self.streams}

    def run_for(self, x: np.ndarray, seconds: float) -> Sample:
        feeds = {INPUT_NAME: x}
        lat: list[list[float]] = [[] for _ in self._calls]
        start = time.perf_counter()
        deadline = start + seconds
        errors: list[BaseException] = []

        def work(i: int) -> None:
            call = self._calls[i]
            try:
                while True:
                    t0 = time.perf_counter()
                    if t0 >= deadline and lat[i]:
                        return
                    call(feeds)
                    lat[i].append(time.perf_counter() - t0)
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(self.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        elapsed = time.perf_counter() - start
        flat = tuple(v for per in lat for v in per)
        return Sample(len(flat), len(x), elapsed, flat)

    def close(self) -> None:
        self._close()
