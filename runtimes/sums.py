"""Running sums of the drift between two sets of logits: exact, mergeable in any order, bounded in memory.

`deploy validate` streams its images, so it keeps only these. Every count is an integer and every float sum an
`ExactSum` (an integer multiple of 2**-SCALE_BITS), so sums of shards added in any order, or restored from a state
file, give the same bits as one pass. The figures that need a median (the reference's margin, the logit noise)
are exact order statistics read from the logits in chunks (`kth_smallest`), not from memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

SCALE_BITS = 1126  # 2**-1126 divides every float64 (the smallest subnormal is 2**-1074, with 52 more bits of room)
_CHUNK = 1 << 10  # int64 holds the sum of 2**10 mantissas below 2**53


class ExactSum:
    """The exact sum of finite float64 values, as one Python integer in units of 2**-SCALE_BITS."""

    __slots__ = ("units",)

    def __init__(self, units: int = 0):
        self.units = units

    def add(self, values: np.ndarray) -> "ExactSum":
        v = np.asarray(values, np.float64).ravel()
        if not len(v):
            return self
        if not np.isfinite(v).all():
            raise ValueError("ExactSum takes finite values only")
        mant, exp = np.frexp(v)
        ints = (mant * 2.0**53).astype(np.int64)  # exact: a float64 mantissa has 53 bits
        shifts = exp.astype(np.int64) + (SCALE_BITS - 53)
        for shift in np.unique(shifts):
            sel = ints[shifts == shift]
            for i in range(0, len(sel), _CHUNK):
                self.units += int(sel[i : i + _CHUNK].sum()) << int(shift)
        return self

    def merge(self, other: "ExactSum") -> "ExactSum":
        self.units += other.units
        return self

    def value(self) -> float:
        """The sum, correctly rounded to float64 (Python's int division rounds correctly)."""
        return self.units / (1 << SCALE_BITS)

    def to_json(self) -> str:
        return hex(self.units)

    @classmethod
    def from_json(cls, text: str) -> "ExactSum":
        return cls(int(text, 16))


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _hex(v: float | None) -> str | None:
    return None if v is None else float(v).hex()


def _unhex(v: str | None) -> float | None:
    return None if v is None else float.fromhex(v)


def margins_of(logits: np.ndarray) -> np.ndarray:
    """Per row: largest minus second-largest logit (0 for a single class)."""
    if logits.shape[1] < 2:
        return np.zeros(logits.shape[0])
    two = np.sort(logits, axis=1)[:, -2:]
    return two[:, 1] - two[:, 0]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@dataclass
class DriftSums:
    """What the drift of a candidate from a reference adds up to over the rows seen so far."""

    samples: int = 0
    classes: int = 0
    reference_bad: int = 0  # rows with a NaN or Inf reference logit
    candidate_bad: int = 0
    bad: int = 0  # rows where either is
    flips: int = 0  # top-1 changed (a bad row counts as changed)
    overlap: int = 0  # shared top-5 entries, summed over good rows
    abs_error: ExactSum | None = None  # sum of |cand - ref| over good rows' logits
    cosine: ExactSum | None = None  # sum over good rows
    kl: ExactSum | None = None  # sum over good rows
    max_abs_error: float | None = None  # over good rows
    max_ref_logit: float | None = None  # max |ref| over rows with a finite reference
    flipped_margin_max: float | None = None  # reference margin, over good rows whose top-1 changed

    def __post_init__(self):
        self.abs_error = self.abs_error or ExactSum()
        self.cosine = self.cosine or ExactSum()
        self.kl = self.kl or ExactSum()

    @property
    def k(self) -> int:
        return min(5, self.classes)

    @classmethod
    def of(cls, reference: np.ndarray, candidate: np.ndarray) -> "DriftSums":
        """The sums of one batch (every figure is computed per row, so a row's share never depends on its batch)."""
        if reference.shape != candidate.shape:
            raise ValueError(f"logit shapes differ: reference {reference.shape}, candidate {candidate.shape}")
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return cls._of(reference.astype(np.float64), candidate.astype(np.float64))

    @classmethod
    def _of(cls, ref: np.ndarray, cand: np.ndarray) -> "DriftSums":
        n, c = ref.shape
        bad_ref = ~np.isfinite(ref).all(axis=1)
        bad_cand = ~np.isfinite(cand).all(axis=1)
        bad = bad_ref | bad_cand
        good = ~bad
        k = min(5, c)
        top_r = np.argsort(-ref, axis=1, kind="stable")[:, :k]
        top_c = np.argsort(-cand, axis=1, kind="stable")[:, :k]
        overlap = (top_r[:, :, None] == top_c[:, None, :]).any(axis=2).sum(axis=1)
        flipped = (top_r[:, 0] != top_c[:, 0]) | bad
        r, q = ref[good], cand[good]
        diff = np.abs(r - q)
        num = (r * q).sum(axis=1)
        den = np.linalg.norm(r, axis=1) * np.linalg.norm(q, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
        lp_r, lp_c = _log_softmax(r), _log_softmax(q)
        kl = (np.exp(lp_r) * (lp_r - lp_c)).sum(axis=1)
        flipped_good = flipped[good]
        margins = margins_of(r)
        out = cls(samples=n, classes=c, reference_bad=int(bad_ref.sum()), candidate_bad=int(bad_cand.sum()),
                  bad=int(bad.sum()), flips=int(flipped.sum()), overlap=int(overlap[good].sum()))
        out.abs_error.add(diff.sum(axis=1))
        out.cosine.add(cos)
        out.kl.add(kl)
        out.max_abs_error = float(diff.max()) if diff.size else None
        finite_ref = np.abs(ref[~bad_ref])
        out.max_ref_logit = float(finite_ref.max()) if finite_ref.size else None
        out.flipped_margin_max = float(margins[flipped_good].max()) if flipped_good.any() else None
        return out

    def merge(self, other: "DriftSums") -> "DriftSums":
        if self.classes and other.classes and self.classes != other.classes:
            raise ValueError(f"cannot add drift over {other.classes} classes to drift over {self.classes}")
        self.classes = self.classes or other.classes
        for f in ("samples", "reference_bad", "candidate_bad", "bad", "flips", "overlap"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.abs_error.merge(other.abs_error)
        self.cosine.merge(other.cosine)
        self.kl.merge(other.kl)
        self.max_abs_error = _max(self.max_abs_error, other.max_abs_error)
        self.max_ref_logit = _max(self.max_ref_logit, other.max_ref_logit)
        self.flipped_margin_max = _max(self.flipped_margin_max, other.flipped_margin_max)
        return self

    def figures(self) -> dict[str, Any]:
        """The Drift fields these sums determine (the median-based ones come from `drift_tail`)."""
        nan = float("nan")
        n, any_bad = self.samples, self.bad > 0
        return {
            "samples": n,
            "max_abs_logit_error": nan if any_bad or self.max_abs_error is None else self.max_abs_error,
            "mean_abs_logit_error": nan if any_bad or not n else self.abs_error.value() / (n * self.classes),
            "max_ref_logit": nan if self.reference_bad or self.max_ref_logit is None else self.max_ref_logit,
            "cosine_similarity": nan if any_bad or not n else self.cosine.value() / n,
            "top1_agreement": float(1.0 - self.flips / n) if n else nan,
            "top5_overlap": self.overlap / (self.k * n) if n else nan,
            "mean_kl": nan if any_bad or not n else max(self.kl.value() / n, 0.0),
            "flipped_margin_max": self.flipped_margin_max or 0.0,
            "nonfinite_rows": self.candidate_bad,
            "reference_nonfinite_rows": self.reference_bad,
        }

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "classes": self.classes, "reference_bad": self.reference_bad,
                "candidate_bad": self.candidate_bad, "bad": self.bad, "flips": self.flips, "overlap": self.overlap,
                "abs_error": self.abs_error.to_json(), "cosine": self.cosine.to_json(), "kl": self.kl.to_json(),
                "max_abs_error": _hex(self.max_abs_error), "max_ref_logit": _hex(self.max_ref_logit),
                "flipped_margin_max": _hex(self.flipped_margin_max)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DriftSums":
        return cls(**{k: d[k] for k in ("samples", "classes", "reference_bad", "candidate_bad", "bad", "flips",
                                        "overlap")},
                   abs_error=ExactSum.from_json(d["abs_error"]), cosine=ExactSum.from_json(d["cosine"]),
                   kl=ExactSum.from_json(d["kl"]), max_abs_error=_unhex(d["max_abs_error"]),
                   max_ref_logit=_unhex(d["max_ref_logit"]), flipped_margin_max=_unhex(d["flipped_margin_max"]))


# --------------------------------------------------------------------------- exact order statistics in chunks


def _keys(v: np.ndarray) -> np.ndarray:
    """float64 -> uint64 with the same order (negative numbers have their bits flipped)."""
    b = np.ascontiguousarray(v, np.float64).view(np.uint64)
    return np.where(b >> np.uint64(63), ~b, b | np.uint64(1 << 63))


def _unkey(key: int) -> float:
    b = key & ~(1 << 63) if key >> 63 else ~key & ((1 << 64) - 1)
    return float(np.array([b], np.uint64).view(np.float64)[0])


def kth_smallest(chunks: Callable[[], Iterable[np.ndarray]], k: int) -> float:
    """The k-th smallest (0-based) of the finite values `chunks()` yields, exactly, in four passes of 16 bits each;
    memory is one chunk and a 65,536-bin histogram however many values there are."""
    prefix, mask = 0, 0
    for shift in (48, 32, 16, 0):
        hist = np.zeros(1 << 16, np.int64)
        for chunk in chunks():
            keys = _keys(chunk.ravel())
            if mask:
                keys = keys[(keys & np.uint64(mask)) == np.uint64(prefix)]
            hist += np.bincount(((keys >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64), minlength=1 << 16)
        cum = np.cumsum(hist)
        if k >= cum[-1]:
            raise ValueError(f"asked for value {k} of {int(cum[-1])}")
        digit = int(np.searchsorted(cum, k, side="right"))
        k -= int(cum[digit - 1]) if digit else 0
        prefix |= digit << shift
        mask |= 0xFFFF << shift
    return _unkey(prefix)


def median(chunks: Callable[[], Iterable[np.ndarray]], count: int) -> float:
    """np.median of the values `chunks()` yields (`count` of them), exactly."""
    if count == 0:
        return float("nan")
    if count % 2:
        return kth_smallest(chunks, count // 2)
    return (kth_smallest(chunks, count // 2 - 1) + kth_smallest(chunks, count // 2)) / 2


PairChunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def drift_tail(pairs: PairChunks, decided_sigmas: float) -> dict[str, Any]:
    """The Drift fields that need the whole set: the reference's median margin, the candidate's logit noise (robust
    std of its error) and the images decided beyond it. `pairs()` yields (reference, candidate) row chunks."""

    def rows():
        for ref, cand in pairs():
            ref, cand = ref.astype(np.float64), cand.astype(np.float64)
            bad_ref = ~np.isfinite(ref).all(axis=1)
            good = ~bad_ref & np.isfinite(cand).all(axis=1)
            yield ref, cand, bad_ref, good

    def margins():
        for ref, _, bad_ref, _ in rows():
            yield margins_of(ref[~bad_ref])

    def errors():
        for ref, cand, _, good in rows():
            yield (cand[good] - ref[good]).ravel()

    n_ref = n_err = 0
    for ref, _, bad_ref, good in rows():
        n_ref += int((~bad_ref).sum())
        n_err += int(good.sum()) * ref.shape[1]
    nan = float("nan")
    noise = nan
    if n_err:
        centre = median(errors, n_err)
        spread = median(lambda: (np.abs(e - centre) for e in errors()), n_err)
        noise = float(1.4826 * spread)
        if noise == 0.0:  # most errors exactly zero: the plain std is the noise
            total = ExactSum()
            for e in errors():
                total.add(e)
            mean = total.value() / n_err
            squares = ExactSum()
            for e in errors():
                squares.add((e - mean) ** 2)
            noise = float(np.sqrt(squares.value() / n_err))
    decided_margin = decided_sigmas * np.sqrt(2.0) * noise
    decided = decided_flips = 0
    if n_err:
        for ref, cand, _, good in rows():
            r, q = ref[good], cand[good]
            sel = margins_of(r) > decided_margin
            decided += int(sel.sum())
            decided_flips += int((np.argmax(r[sel], axis=1) != np.argmax(q[sel], axis=1)).sum()) if sel.any() else 0
    return {"ref_margin_median": median(margins, n_ref), "logit_noise": noise,
            "decided_margin": float(decided_margin), "decided_samples": decided,
            "decided_top1_agreement": float(1.0 - decided_flips / decided) if decided else 1.0}
