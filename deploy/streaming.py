"""Validation as a stream: every batch goes through eager and every artifact, and only running sums are kept.

A `Measurer` holds the opened runners and turns one batch into `RunSums` (integer counts and exact float sums, so
any grouping of batches adds up to the same bits) plus the batch's logits, which go to a `LogitStore` on disk (the
audit trail, and the source the medians are read from in chunks). The same Measurer runs in this process, fed by
the decoding pool, or once per Dask worker on a shard of batches (deploy/cluster.py). A `RunState` in the export
folder records the batches done and their sums, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from partialnet.errors import UsageError
from partialnet.files import atomic_write_json, atomic_write_text
from runtimes.base import INPUT_NAME, OUTPUT_NAME
from runtimes.sums import DriftSums

STATE_FORMAT = 1
MAX_ERRORS = 5  # unreadable-image messages kept (the count is exact)
CHECKPOINT_S = 10.0  # seconds between state saves
# Eager's fp32-vs-float64 error (the noise floor of the fp32 tolerance) is measured on the batches holding the first
# this many rows: it is a property of the model, and the float64 pass costs about two eager passes.
NOISE_FLOOR_ROWS = 1024


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image: is the label among the k largest logits (ties broken by lower index, as in Drift)."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def pair_name(reference: str, candidate: str) -> str:
    return f"{reference} -> {candidate}"


@dataclass
class RunSums:
    """Everything a validation keeps of the images it has seen: counts and exact sums, mergeable in any order."""

    images: int = 0  # readable images measured
    unreadable: int = 0
    errors: list[str] = field(default_factory=list)
    class_totals: list[int] | None = None
    top1: dict[str, int] = field(default_factory=dict)
    top5: dict[str, int] = field(default_factory=dict)
    class_top1: dict[str, list[int]] = field(default_factory=dict)
    paired: dict[str, list[int]] = field(default_factory=dict)  # key -> [top-1 b, c, top-5 b, c] against eager
    drift: dict[str, DriftSums] = field(default_factory=dict)  # pair_name -> sums
    noise_floor: float = 0.0  # max |eager fp32 - eager float64|
    seconds: dict[str, float] = field(default_factory=dict)  # compute time per runner (not a result)
    decode_s: float = 0.0  # seconds of decoding (all workers)
    wait_s: float = 0.0  # seconds the runners waited for decoded batches

    def merge(self, other: "RunSums") -> "RunSums":
        self.images += other.images
        self.unreadable += other.unreadable
        self.errors = (self.errors + other.errors)[:MAX_ERRORS]
        if other.class_totals is not None:
            self.class_totals = _add_lists(self.class_totals, other.class_totals)
        for mine, theirs in ((self.top1, other.top1), (self.top5, other.top5), (self.seconds, other.seconds)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for mine_l, theirs_l in ((self.class_top1, other.class_top1), (self.paired, other.paired)):
            for k, v in theirs_l.items():
                mine_l[k] = _add_lists(mine_l.get(k), v)
        for k, d in other.drift.items():
            self.drift.setdefault(k, DriftSums()).merge(d)
        self.noise_floor = max(self.noise_floor, other.noise_floor)
        self.decode_s += other.decode_s
        self.wait_s += other.wait_s
        return self

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "unreadable": self.unreadable, "errors": self.errors,
                "class_totals": self.class_totals, "top1": self.top1, "top5": self.top5,
                "class_top1": self.class_top1, "paired": self.paired,
                "drift": {k: d.to_json() for k, d in self.drift.items()}, "noise_floor": self.noise_floor.hex(),
                "seconds": self.seconds, "decode_s": self.decode_s, "wait_s": self.wait_s}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunSums":
        return cls(images=d["images"], unreadable=d["unreadable"], errors=d["errors"], class_totals=d["class_totals"],
                   top1=d["top1"], top5=d["top5"], class_top1=d["class_top1"], paired=d["paired"],
                   drift={k: DriftSums.from_json(v) for k, v in d["drift"].items()},
                   noise_floor=float.fromhex(d["noise_floor"]), seconds=d["seconds"], decode_s=d["decode_s"], wait_s=d["wait_s"])


def _add_lists(a: list[int] | None, b: list[int]) -> list[int]:
    return list(b) if a is None else [x + y for x, y in zip(a, b)]


@dataclass
class ShardResult:
    """What one batch, or one cluster worker's shard of consecutive batches, hands back."""

    first: int  # first batch
    count: int  # batches
    sums: RunSums
    logits: dict[str, np.ndarray]  # key -> float32 [rows, classes]; NaN rows where an image was unreadable


class Measurer:
    """The opened runners of an export, measuring batch after batch into running sums."""

    def __init__(self, runners: dict[str, Any], eager_key: str, model: Any, pairs: Sequence[tuple[str, str]],
                 num_classes: int):
        from runtimes.eager import NoiseFloor

        self.runners, self.eager_key, self.pairs, self.num_classes = runners, eager_key, list(pairs), num_classes
        self.floor = NoiseFloor(model)

    def measure(self, x: np.ndarray, ok: np.ndarray, labels: np.ndarray | None,
                floor: bool = True) -> tuple[RunSums, dict[str, np.ndarray]]:
        feeds = {INPUT_NAME: x}
        sums = RunSums()
        logits: dict[str, np.ndarray] = {}
        for key, runner in self.runners.items():
            start = time.perf_counter()
            logits[key] = runner.run(feeds)[OUTPUT_NAME]
            sums.seconds[key] = time.perf_counter() - start
        good = {k: v[ok] for k, v in logits.items()}
        sums.images, sums.unreadable = int(ok.sum()), int((~ok).sum())
        if sums.images:
            if floor:
                sums.noise_floor = self.floor.of(x[ok], good[self.eager_key])
            for ref, cand in self.pairs:
                sums.drift[pair_name(ref, cand)] = DriftSums.of(good[ref], good[cand])
        if labels is not None:
            self._accuracy(sums, good, labels[ok])
        stored = {}
        for k, v in logits.items():
            out = np.full(v.shape, np.nan, np.float32)
            out[ok] = v[ok]
            stored[k] = out
        return sums, stored

    def _accuracy(self, sums: RunSums, good: dict[str, np.ndarray], labels: np.ndarray) -> None:
        sums.class_totals = np.bincount(labels, minlength=self.num_classes).tolist()
        correct = {k: (topk_correct(v, labels, 1), topk_correct(v, labels, 5)) for k, v in good.items()}
        e1, e5 = correct[self.eager_key]
        for k, (c1, c5) in correct.items():
            sums.top1[k], sums.top5[k] = int(c1.sum()), int(c5.sum())
            sums.class_top1[k] = np.bincount(labels[c1], minlength=self.num_classes).tolist()
            if k != self.eager_key:
                sums.paired[k] = [int((e1 & ~c1).sum()), int((~e1 & c1).sum()),
                                  int((e5 & ~c5).sum()), int((~e5 & c5).sum())]

    def results(self, source: Any, labels: np.ndarray | None, batch_size: int, todo: Sequence[int],
                workers: int = 0, first_index: int = 0) -> Iterator[ShardResult]:
        """One result per batch of `todo` (numbered from `first_index`, the batch `source`'s row 0 belongs to)."""
        batches = source.batches(batch_size, todo, workers, first_index=first_index)
        while True:
            start = time.perf_counter()
            b = next(batches, None)
            waited = time.perf_counter() - start
            if b is None:
                return
            local = (b.index - first_index) * batch_size
            sums, logits = self.measure(b.x, b.ok, None if labels is None else labels[local : local + len(b.x)],
                                        floor=b.index * batch_size < NOISE_FLOOR_ROWS)
            sums.decode_s, sums.wait_s, sums.errors = b.decode_s, waited, b.errors[:MAX_ERRORS]
            yield ShardResult(b.index, 1, sums, logits)


def merge_results(results: Sequence[ShardResult]) -> ShardResult:
    """Consecutive results as one (what a cluster worker returns for its shard)."""
    total = RunSums()
    for r in results:
        total.merge(r.sums)
    keys = results[0].logits
    return ShardResult(results[0].first, sum(r.count for r in results), total,
                       {k: np.concatenate([r.logits[k] for r in results]) for k in keys})


# --------------------------------------------------------------------------- logits on disk


def _file_name(key: str) -> str:
    return key.replace("/", "_").replace("@", "_at_") + ".npy"


class LogitStore:
    """One float32 .npy per runner, [rows, classes], written a batch at a time with positioned writes and read back
    in chunks: never held in memory, never memory-mapped whole."""

    def __init__(self, folder: Path, keys: Sequence[str], rows: int, classes: int, *, create: bool):
        self.folder, self.keys, self.rows, self.classes = Path(folder), list(keys), rows, classes
        self.paths = {k: self.folder / _file_name(k) for k in keys}
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
            for p in self.paths.values():
                mm = np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(rows, classes))
                del mm  # the header and a sparse file of the full size; rows are written with pwrite
        self.offsets = {k: os.path.getsize(p) - rows * classes * 4 for k, p in self.paths.items()}
        self._fds = {k: os.open(p, os.O_RDWR) for k, p in self.paths.items()}

    def write(self, key: str, first_row: int, logits: np.ndarray) -> None:
        data = np.ascontiguousarray(logits, np.float32)
        os.pwrite(self._fds[key], data.tobytes(), self.offsets[key] + first_row * self.classes * 4)

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        n = (stop - start) * self.classes * 4
        buf = os.pread(self._fds[key], n, self.offsets[key] + start * self.classes * 4)
        return np.frombuffer(buf, np.float32).reshape(stop - start, self.classes)

    def pairs(self, reference: str, candidate: str, chunk_rows: int = 8192):
        """A function yielding (reference, candidate) logits in row chunks, as runtimes.sums.drift_tail reads them."""
        def chunks():
            for i in range(0, self.rows, chunk_rows):
                stop = min(self.rows, i + chunk_rows)
                yield self.read(reference, i, stop), self.read(candidate, i, stop)
        return chunks

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def publish(self, dest: Path, names: Sequence[str], labels: np.ndarray | None, ok_rows: np.ndarray) -> None:
        """Move the .npy files into `dest` with files.txt (row, path, label, ok|unreadable), the list last."""
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.paths.values():
            shutil.move(str(p), str(dest / p.name))
        lines = [f"{name}\t{-1 if labels is None else int(labels[i])}\t{'ok' if ok_rows[i] else 'unreadable'}"
                 for i, name in enumerate(names)]
        atomic_write_text(dest / "files.txt", "\n".join(lines) + "\n", force=True)

    def ok_rows(self) -> np.ndarray:
        """Rows whose eager logits are finite or were written (unreadable images are NaN rows)."""
        ok = []
        for i in range(0, self.rows, 8192):
            ok.append(np.isfinite(self.read(self.keys[0], i, min(self.rows, i + 8192))).any(axis=1))
        return np.concatenate(ok) if ok else np.zeros(0, bool)


def check_save_dir(path: Path) -> None:
    """--save-logits names a new or empty folder: its files are never overwritten."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--save-logits {path} {'is a file' if not path.is_dir() else 'is not empty'}; name a new "
                         f"or empty folder for the logits and files.txt.")


# --------------------------------------------------------------------------- resume


def fingerprint(parts: Any) -> str:
    """A sha256 of plain data (JSON, keys sorted; anything else by its str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class RunState:
    """The state file of a validation in progress: what it measures (fingerprint), the batches done and their sums."""

    folder: Path  # the state folder (inside the export folder)
    fingerprint: str
    batches: int
    done: set[int] = field(default_factory=set)
    sums: RunSums = field(default_factory=RunSums)
    elapsed_s: float = 0.0

    @property
    def path(self) -> Path:
        return self.folder / "state.json"

    def save(self) -> None:
        atomic_write_json(self.path, {"format": STATE_FORMAT, "fingerprint": self.fingerprint,
                                      "batches": self.batches,
                                      "done": [[a, a + n] for a, n in runs(sorted(self.done))],
                                      "sums": self.sums.to_json(), "elapsed_s": self.elapsed_s}, force=True)

    @classmethod
    def load(cls, folder: Path) -> "RunState | None":
        try:
            d = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            if d.get("format") != STATE_FORMAT:
                return None
            done = {i for a, b in d["done"] for i in range(a, b)}
            return cls(folder, d["fingerprint"], d["batches"], done, RunSums.from_json(d["sums"]), d["elapsed_s"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def runs(items: Sequence[int], longest: int | None = None) -> list[tuple[int, int]]:
    """Runs of consecutive numbers in sorted `items`, at most `longest` long each: (first, count)."""
    out: list[tuple[int, int]] = []
    for i in items:
        if out and out[-1][0] + out[-1][1] == i and (longest is None or out[-1][1] < longest):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
