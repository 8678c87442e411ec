"""The one comparison path: run a set of runners on the same batches, then judge pairs of logits.

As in Polygraphy's Comparator, running and judging are separate: `run_all` returns logits per runner, `Drift.between`
turns two sets of logits into plain numbers, and a `Tolerance` decides. The post-export check, the INT8 checks,
the sensitivity pass and `deploy validate` all go through these.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

from .base import INPUT_NAME, OUTPUT_NAME, Runner
from .sums import DriftSums, PairChunks, drift_tail


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

# A ranking gate counts a changed top-1 only where the eager margin exceeds this many standard deviations of the
# difference of two logit errors (sqrt(2) x the artifact's logit noise): below it, a flip is a near-tie.
DECIDED_SIGMAS = 3.0


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
    # Rows holding a NaN or Inf logit (the candidate's, the reference's). Every figure above is NaN when one does,
    # and such a row counts as a changed top-1: a NaN never passes a gate.
    nonfinite_rows: int = 0
    reference_nonfinite_rows: int = 0
    # The candidate's logit noise (robust std of candidate - reference over every logit) and the images whose top-1
    # margin exceeds DECIDED_SIGMAS * sqrt(2) * that noise: a flip there is an error, not a near-tie resolved the
    # other way. Agreement over those images is what a ranking gate holds an artifact to.
    logit_noise: float = 0.0
    decided_margin: float = 0.0
    decided_samples: int = 0
    decided_top1_agreement: float = 1.0

    @classmethod
    def between(cls, reference: np.ndarray, candidate: np.ndarray) -> "Drift":
        """The drift of `candidate` from `reference` (rows are images): the running sums of one batch, finished."""
        sums = DriftSums.of(reference, candidate)
        return cls.from_sums(sums, lambda: iter([(reference, candidate)]))

    @classmethod
    def from_sums(cls, sums: DriftSums, pairs: PairChunks) -> "Drift":
        """The drift that running sums add up to; `pairs()` yields the same rows again, in chunks, for the medians."""
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # NaN/Inf rows are counted, not warned
            return cls(**sums.figures(), **drift_tail(pairs, DECIDED_SIGMAS))

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
    if row.get("nonfinite_rows"):
        return f"{name}: NaN or Inf logits on {row['nonfinite_rows']} of {row['samples']} images"
    note = (f"{name}: top-1 changed on {flips} of {row['samples']} images, whose eager top-1 margin is at most "
            f"{row['flipped_margin_max']:.3g} logits (median margin on this set {row['ref_margin_median']:.3g}, "
            f"mean |logit error| {row['mean_abs_logit_error']:.3g})")
    if "decided_samples" in row:
        decided_flips = round((1.0 - row["decided_top1_agreement"]) * row["decided_samples"])
        note += (f"; {decided_flips} of the changes on the {row['decided_samples']} images decided beyond its logit "
                 f"noise (margin > {row['decided_margin']:.3g})")
    return note


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
    # Top-1 agreement over the decided images only (see Drift.decided_samples): what an artifact can be held to
    # when untrained or uncertain weights leave many near-ties.
    min_decided_top1_agreement: float | None = None

    def abs_limit(self, d: Drift, noise_floor: float = 0.0) -> float | None:
        if self.max_abs_rel is None:
            return None
        return max(self.max_abs_rel * max(1.0, d.max_ref_logit), self.noise_multiple * noise_floor)

    def failures(self, d: Drift, noise_floor: float = 0.0) -> list[str]:
        """Every way `d` misses this tolerance; a NaN figure fails (each test is `not (value within limit)`)."""
        out = []
        if d.nonfinite_rows or d.reference_nonfinite_rows:
            who = []
            if d.nonfinite_rows:
                who.append(f"the artifact's logits hold NaN or Inf on {d.nonfinite_rows} of {d.samples} rows")
            if d.reference_nonfinite_rows:
                who.append(f"the reference's logits hold NaN or Inf on {d.reference_nonfinite_rows} of {d.samples} rows")
            out.append("; ".join(who))
        limit = self.abs_limit(d, noise_floor)
        if limit is not None and not d.max_abs_logit_error <= limit:
            out.append(f"max |logit error| {d.max_abs_logit_error:.3g} exceeds {limit:.3g}" if math.isfinite(
                d.max_abs_logit_error) else f"max |logit error| is {d.max_abs_logit_error} (not a number)")
        if self.min_top1_agreement is not None and not d.top1_agreement >= self.min_top1_agreement:
            out.append(f"top-1 agreement {d.top1_agreement:.4f} is below {self.min_top1_agreement:.4f}")
        if self.min_decided_top1_agreement is not None and d.decided_samples and \
                not d.decided_top1_agreement >= self.min_decided_top1_agreement:
            out.append(f"top-1 agreement {d.decided_top1_agreement:.4f} on the {d.decided_samples} of {d.samples} "
                       f"images whose eager margin exceeds {d.decided_margin:.3g} logits is below "
                       f"{self.min_decided_top1_agreement:.4f} (all images: {d.top1_agreement:.4f})")
        if self.min_cosine is not None and not d.cosine_similarity >= self.min_cosine:
            out.append(f"cosine similarity {d.cosine_similarity:.6f} is below {self.min_cosine:.6f}")
        return out

    def rule(self) -> str:
        """The gate in one sentence, for reports."""
        parts = []
        if self.max_abs_rel is not None:
            parts.append(f"max |logit error| <= max({self.max_abs_rel:g} x max(1, max|eager logit|), "
                         f"{self.noise_multiple:g} x eager's fp32-vs-float64 error)")
        if self.min_top1_agreement is not None:
            parts.append(f"top-1 agreement with eager >= {self.min_top1_agreement:g} on every image")
        if self.min_decided_top1_agreement is not None:
            parts.append(f"top-1 agreement with eager >= {self.min_decided_top1_agreement:g} on the images whose eager "
                         f"top-1 margin exceeds {DECIDED_SIGMAS:g} x sqrt(2) x the artifact's logit noise (robust std of "
                         f"its logit error, 1.4826 x MAD); flips below that margin are near-ties, reported but not gated")
        if self.min_cosine is not None:
            parts.append(f"mean cosine similarity of the logits >= {self.min_cosine:g}")
        parts.append("no NaN or Inf logits")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["rule"] = self.rule()
        return out


# Per precision: an FP32 artifact must agree with eager to fp32 rounding; lower precisions are judged on ranking.
TOLERANCES = {
    "fp32": Tolerance(max_abs_rel=1e-4),
    "fp16": Tolerance(max_abs_rel=5e-2, min_decided_top1_agreement=0.97),
    "bf16": Tolerance(max_abs_rel=2e-1, min_decided_top1_agreement=0.95),
    "int8": Tolerance(min_decided_top1_agreement=0.90, min_cosine=0.97),
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
