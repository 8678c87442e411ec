"""Images as a stream of batches: decoded and preprocessed by a pool of worker processes, a few batches ahead.

Batch i always holds rows [i * B, (i + 1) * B) of the listing, whatever can be read: an unreadable image keeps its
place as a row of zeros marked not ok, so every batch has the same composition in every run (ONNX Runtime and
OpenVINO logits can depend on the batch's size in their last bits) and the caller leaves such rows out of its sums.
"""
from __future__ import annotations

import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from partialnet.variants import Preprocess

PREFETCH = 2  # batches decoded ahead of the one being run, per worker's share


@dataclass
class Batch:
    index: int  # batch number: rows [index * batch_size, ...)
    x: np.ndarray  # float32 [b, 3, N, N]
    ok: np.ndarray  # bool [b]: False where the image could not be read (its row is zeros)
    errors: list[str] = field(default_factory=list)
    decode_s: float = 0.0  # seconds spent reading and preprocessing this batch


def decode(paths: Sequence[str], pp: Preprocess) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Read and preprocess `paths` into one batch (run in a worker process)."""
    from partialnet.errors import ImageError
    from partialnet.preprocess import load_image, preprocess_image

    start = time.perf_counter()
    x = np.zeros((len(paths), 3, pp.input_size, pp.input_size), np.float32)
    ok = np.zeros(len(paths), bool)
    errors = []
    for i, p in enumerate(paths):
        try:
            x[i] = preprocess_image(load_image(p), pp)
            ok[i] = True
        except ImageError as e:
            errors.append(str(e))
    return x, ok, errors, time.perf_counter() - start


def _ignore_interrupts() -> None:
    """Ctrl-C is the parent's to handle (it saves the state); a decoding worker just stops with the pool."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class FileSource:
    """Image files, decoded on demand through the one preprocessing contract."""

    files: list[str]
    pp: Preprocess

    def __len__(self) -> int:
        return len(self.files)

    def part(self, start: int, stop: int) -> "FileSource":
        return FileSource(self.files[start:stop], self.pp)

    def batches(self, batch_size: int, todo: Sequence[int], workers: int = 0,
                first_index: int = 0) -> Iterator[Batch]:
        """The batches numbered `todo` (in that order), decoded by `workers` processes (0: in this one)."""
        rows = [self.files[i * batch_size : (i + 1) * batch_size] for i in todo]
        if workers <= 0:
            for i, paths in zip(todo, rows):
                yield Batch(first_index + i, *decode(paths, self.pp))
            return
        ctx = multiprocessing.get_context("forkserver")  # fresh processes: no copy of the runtimes' threads or models
        with ctx.Pool(workers, initializer=_ignore_interrupts) as pool:
            pending: deque = deque()
            jobs = iter(zip(todo, rows))
            for i, paths in jobs:  # keep workers + PREFETCH * workers batches in flight, no more
                pending.append((i, pool.apply_async(decode, (paths, self.pp))))
                if len(pending) >= workers * (1 + PREFETCH):
                    break
            while pending:
                i, job = pending.popleft()
                got = job.get()
                nxt = next(jobs, None)
                if nxt is not None:
                    pending.append((nxt[0], pool.apply_async(decode, (nxt[1], self.pp))))
                yield Batch(first_index + i, *got)


@dataclass
class ArraySource:
    """Preprocessed rows of an array (in memory, or a memory-mapped .npy read a batch at a time)."""

    array: np.ndarray
    rows: list[int] | None = None  # the sampled rows, None for all

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows)

    def _take(self, start: int, stop: int) -> np.ndarray:
        if self.rows is None:
            return np.array(self.array[start:stop], np.float32)
        return np.array(self.array[self.rows[start:stop]], np.float32)

    def part(self, start: int, stop: int) -> "ArraySource":
        return ArraySource(self._take(start, stop))

    def batches(self, batch_size: int, todo: Sequence[int], workers: int = 0,
                first_index: int = 0) -> Iterator[Batch]:
        for i in todo:
            x = self._take(i * batch_size, (i + 1) * batch_size)
            yield Batch(first_index + i, x, np.ones(len(x), bool))


def file_source(files: Sequence[Path], pp: Preprocess) -> FileSource:
    return FileSource([str(f) for f in files], pp)
