"""The one comparison path: run a set of runners on the same batches, then judge pairs of logits.

As in Polygraphy's Comparator, running and judging are separate: `run_all` returns logits per runner, `Drift.between`
turns two sets of logits into plain numbers, and a `Tolerance` decides. The post-export check, the INT8 checks,
the sensitivity pass and `deploy validate` all go through these.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

from .base import INPUT_NAME, OUTPUT_NAME, Runner


def run_all(runners: Mapping[str, Runner], x: np.ndarray, batch_size: int,
            track: Callable[[Iterable[int]], Iterable[int]] | None = None) -> dict[str, np.ndarray]:
    """Logits of every runner on the same batches of `x` (each batch goes through all runners in turn)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    starts: Iterable[int] = range(0, len(x), batch_size)
    if track is not None:
        starts = track(starts)
    outs: dict[str, list[np.ndarray]] = {k: [] for k in runners}
    for i in starts:
        feeds = {INPUT_NAME: x[i : i + batch_size]}
        for key, runner in runners.items():
            outs[key].append(runner.run(feeds)[OUTPUT_NAME])
    return {k: np.concatenate(v) for k, v in outs.items()}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class Drift:
    samples: int
    max_abs_logit_error: float
    mean_abs_logit_error: float
    max_ref_logit: float
    cosine_similarity: float  # mean over samples
    top1_agreement: float
    top5_overlap: float  # mean |top5(ref) & top5(cand)| / 5
    mean_kl: float  # KL(softmax(ref) || softmax(cand)), mean over samples
    # How decided the reference's top-1 is (largest minus second-largest logit): the median over the samples, and
    # the largest margin among the samples whose top-1 changed (0 when none did). Disagreements only at margins far
    # below the median are near-ties resolved the other way (untrained weights make many); one at a typical margin
    # is a real error.
    ref_margin_median: float = 0.0
    flipped_margin_max: float = 0.0

    @classmethod
    def between(cls, reference: np.ndarray, candidate: np.ndarray) -> "Drift":
        if reference.shape != candidate.shape:
            raise ValueError(f"logit shapes differ: reference {reference.shape}, candidate {candidate.shape}")
        ref = reference.astype(np.float64)
        cand = candidate.astype(np.float64)
        diff = np.abs(ref - cand)
        num = (ref * cand).sum(axis=1)
        den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
        k = min(5, ref.shape[1])
        top_r = np.argsort(-ref, axis=1, kind="stable")[:, :k]
        top_c = np.argsort(-cand, axis=1, kind="stable")[:, :k]
        overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_r.tolist(), top_c.tolist())])
        flipped = top_r[:, 0] != top_c[:, 0]
        if ref.shape[1] > 1:
            two = np.sort(ref, axis=1)[:, -2:]
            margins = two[:, 1] - two[:, 0]
        else:
            margins = np.zeros(ref.shape[0])
        lp_r, lp_c = _log_softmax(ref), _log_softmax(cand)
        kl = (np.exp(lp_r) * (lp_r - lp_c)).sum(axis=1)
        return cls(
            samples=int(ref.shape[0]),
            max_abs_logit_error=float(diff.max()),
            mean_abs_logit_error=float(diff.mean()),
            max_ref_logit=float(np.abs(ref).max()),
            cosine_similarity=float(cos.mean()),
            top1_agreement=float(1.0 - flipped.mean()),
            top5_overlap=float(overlap),
            mean_kl=float(max(kl.mean(), 0.0)),
            ref_margin_median=float(np.median(margins)),
            flipped_margin_max=float(margins[flipped].max()) if flipped.any() else 0.0,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def disagreement_notes(rows: Iterable[dict], samples_key: str = "samples") -> list[str]:
    """The disagreement note of each non-eager (backend, precision) among `rows` (report rows holding a Drift's
    fields), once per pair even when rows repeat it per batch size."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in rows:
        key = (r["backend"], r["precision"])
        if r.get("role") == "reference" or key in seen:
            continue
        seen.add(key)
        note = disagreement_note(f"{r['backend']} {r['precision']}", {**r, "samples": r[samples_key]})
        if note:
            out.append(note)
    return out


def disagreement_note(name: str, row: dict) -> str | None:
    """One line saying how decided the images were on which `name` changed the reference's top-1 (None when none
    did); `row` holds a Drift's fields."""
    flips = round((1.0 - row["top1_agreement"]) * row["samples"])
    if flips == 0:
        return None
    return (f"{name}: top-1 changed on {flips} of {row['samples']} images, whose eager top-1 margin is at most "
            f"{row['flipped_margin_max']:.3g} logits (median margin on this set {row['ref_margin_median']:.3g}, "
            f"mean |logit error| {row['mean_abs_logit_error']:.3g})")


@dataclass(frozen=True)
class Tolerance:
    """Gates on drift.

    `max_abs_rel` scales with the logit magnitude: error <= max_abs_rel * max(1, max|ref|). Some networks are
    ill-conditioned in fp32 (a LayerNorm over nearly constant tokens amplifies rounding), so the eager model's own
    fp32 error against float64 on the same inputs (`noise_floor`) also counts: any reordering of the arithmetic,
    exact in real numbers, moves the logits by about that much. The limit is the larger of the two.
    """

    max_abs_rel: float | None = None
    min_top1_agreement: float | None = None
    min_cosine: float | None = None
    noise_multiple: float = 4.0

    def abs_limit(self, d: Drift, noise_floor: float = 0.0) -> float | None:
        if self.max_abs_rel is None:
            return None
        return max(self.max_abs_rel * max(1.0, d.max_ref_logit), self.noise_multiple * noise_floor)

    def failures(self, d: Drift, noise_floor: float = 0.0) -> list[str]:
        out = []
        limit = self.abs_limit(d, noise_floor)
        if limit is not None:
            if d.max_abs_logit_error > limit:
                out.append(f"max |logit error| {d.max_abs_logit_error:.3g} exceeds {limit:.3g}")
        if self.min_top1_agreement is not None and d.top1_agreement < self.min_top1_agreement:
            out.append(f"top-1 agreement {d.top1_agreement:.4f} is below {self.min_top1_agreement:.4f}")
        if self.min_cosine is not None and d.cosine_similarity < self.min_cosine:
            out.append(f"cosine similarity {d.cosine_similarity:.6f} is below {self.min_cosine:.6f}")
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# Per precision: an FP32 artifact must agree with eager to fp32 rounding; lower precisions are judged on ranking.
TOLERANCES = {
    "fp32": Tolerance(max_abs_rel=1e-4),
    "fp16": Tolerance(max_abs_rel=5e-2, min_top1_agreement=0.97),
    "bf16": Tolerance(max_abs_rel=2e-1, min_top1_agreement=0.95),
    "int8": Tolerance(min_top1_agreement=0.90, min_cosine=0.97),
}


@dataclass(frozen=True)
class Verdict:
    """A candidate's drift from the reference, the absolute limit that applied, and every failed gate."""

    drift: Drift
    limit: float | None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def judge(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance, noise_floor: float = 0.0) -> Verdict:
    """Measure `candidate` against `reference` and hold it to `tolerance`."""
    drift = Drift.between(reference, candidate)
    return Verdict(drift, tolerance.abs_limit(drift, noise_floor), tolerance.failures(drift, noise_floor))
