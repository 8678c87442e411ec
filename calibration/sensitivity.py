"""Which blocks make INT8 drift, and which to keep in float to meet a requested agreement or accuracy drop.

The pass quantizes *one unit at a time* (a block, the stem, a patch merging or the head) with everything else in
float, on the shared calibration ranges, and measures the logits' drift from FP32 on the evaluation images. That
isolates each unit's own contribution and costs one quantization per unit (T0 has 13 blocks and 5 other units;
an onnxruntime quantization of T0 takes a few seconds once ranges are cached). Units are ranked by mean KL
divergence of the softmax (continuous, unlike top-1 agreement on a few dozen images).

Then a greedy loop starts from the whole model quantized under the base policy and keeps the worst-ranked units in
float one by one, re-quantizing and re-measuring after each, until the target holds or every unit is float. The
units it kept, with their measured drift, become part of the policy every backend uses.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from partialnet.errors import UsageError

from runtimes.compare import Drift, run_all

from .ort_int8 import CPU_SCHEME, QuantSession
from .policy import DEFAULT_POLICY, FloatPolicy


@dataclass(frozen=True)
class Probe:
    """One quantization's drift from FP32 on the evaluation images, and its top-1 accuracy when labelled."""

    drift: Drift
    top1_accuracy: float | None = None

    @classmethod
    def of(cls, fp32_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray | None) -> "Probe":
        acc = None if labels is None else float((logits.argmax(1) == labels).mean())
        return cls(Drift.between(fp32_logits, logits), acc)

    def describe(self) -> str:
        d = self.drift
        text = f"top-1 agreement {d.top1_agreement:.4f}, cosine {d.cosine_similarity:.5f}, KL {d.mean_kl:.2e}"
        return text + (f", top-1 {self.top1_accuracy:.4f}" if self.top1_accuracy is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return {**self.drift.to_dict(), "top1_accuracy": self.top1_accuracy}


@dataclass
class Target:
    """What the INT8 model must reach: agreement with FP32 top-1, and/or at most this top-1 drop (fractions)."""

    top1_agreement: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if self.top1_agreement is None and self.max_accuracy_drop is None:
            raise UsageError("the sensitivity pass needs a target: a top-1 agreement or a maximum accuracy drop.")
        if self.top1_agreement is not None and not 0 < self.top1_agreement <= 1:
            raise UsageError(f"target top-1 agreement is a fraction in (0, 1]; got {self.top1_agreement}.")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 1:
            raise UsageError(f"maximum accuracy drop is a fraction in [0, 1) (0.01 = one point); got {self.max_accuracy_drop}.")

    def met(self, d: Probe, fp32_accuracy: float | None) -> bool:
        ok = self.top1_agreement is None or d.drift.top1_agreement >= self.top1_agreement
        if self.max_accuracy_drop is not None:
            ok = ok and d.top1_accuracy is not None and fp32_accuracy is not None and (
                fp32_accuracy - d.top1_accuracy <= self.max_accuracy_drop + 1e-12)
        return ok


@dataclass
class SensitivityResult:
    """The ranking (worst first), the greedy steps, and the units kept in float."""

    target: Target
    evaluation: str
    fp32_accuracy: float | None
    base: Probe
    ranking: list[tuple[str, Probe]]
    steps: list[tuple[list[str], Probe]] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    met: bool = False

    def reasons(self) -> dict[str, str]:
        """For each unit kept in float, its rank and drift when it alone was quantized."""
        rank = {u: i + 1 for i, (u, _) in enumerate(self.ranking)}
        drift = dict(self.ranking)
        return {u: f"sensitivity rank {rank[u]} of {len(self.ranking)}; quantized alone: {drift[u].describe()}"
                for u in self.kept_float}

    def policy(self, base: FloatPolicy = DEFAULT_POLICY) -> FloatPolicy:
        """`base` with the kept units added, each with its measured reason."""
        return base.with_units(self.kept_float, self.reasons(), name=f"{base.name}+sensitivity")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": asdict(self.target),
            "evaluated_on": self.evaluation,
            "fp32_top1_accuracy": self.fp32_accuracy,
            "all_quantized": self.base.to_dict(),
            "ranking_worst_first": [{"unit": u, **d.to_dict()} for u, d in self.ranking],
            "greedy_steps": [{"float_units": list(us), **d.to_dict()} for us, d in self.steps],
            "kept_float": self.kept_float,
            "target_met": self.met,
        }


def _logits(path: Path, images: np.ndarray, threads: int | None, batch: int = 16) -> np.ndarray:
    from runtimes.ort import OrtRunner  # int8 through the runner, so a CPU without VNNI gets exact kernels

    runner = OrtRunner(path, precision="int8", threads=threads)
    try:
        return run_all({"probe": runner}, images, batch)["probe"]
    finally:
        runner.close()


def sensitivity_pass(
    session: QuantSession,
    fp32_logits: np.ndarray,
    target: Target,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    base: FloatPolicy = DEFAULT_POLICY,
    threads: int | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> SensitivityResult:
    """Rank units by their INT8 drift and keep the worst in float until `target` holds.

    `images` default to the calibration images; `fp32_logits` are the FP32 (eager) logits on those images.
    `labels` are needed for a maximum accuracy drop.
    """
    x = session.calib.images if images is None else images
    if fp32_logits.shape[0] != len(x):
        raise UsageError(f"fp32_logits has {fp32_logits.shape[0]} rows for {len(x)} evaluation images.")
    if target.max_accuracy_drop is not None and labels is None:
        raise UsageError("a maximum accuracy drop needs labelled evaluation images (class subfolders or a labelled list).")
    fp32_acc = None if labels is None else float((fp32_logits.argmax(1) == labels).mean())
    _, graph = session.graph(CPU_SCHEME)
    base_exclude = set(base.onnx_nodes_to_exclude(graph))
    units = [u for u in graph.unit_names() if u not in base.units]
    weighted = {u: [n.name for n in graph.nodes if graph.units.get(n.name) == u and n.op_type in CPU_SCHEME.op_types
                    and n.name not in base_exclude] for u in units}
    units = [u for u in units if weighted[u]]
    where = "calibration images" if images is None else "evaluation images"

    with tempfile.TemporaryDirectory(dir=session.workdir) as tmp:
        path = Path(tmp) / "probe.onnx"

        def measure(exclude: list[str], include: list[str] | None = None) -> Probe:
            session.quantize(path, CPU_SCHEME, exclude, include)
            return Probe.of(fp32_logits, _logits(path, x, threads), labels)

        base_drift = measure(sorted(base_exclude))
        result = SensitivityResult(target, f"{len(x)} {where}", fp32_acc, base_drift, [])
        result.steps.append(([], base_drift))
        if target.met(base_drift, fp32_acc):
            log(f"sensitivity: everything quantized already meets the target ({base_drift.describe()})")
            result.met = True
            return result
        log(f"sensitivity: quantizing each of {len(units)} units alone ({len(x)} {where})")
        ranking = [(u, measure(sorted(base_exclude), weighted[u])) for u in units]
        ranking.sort(key=lambda t: (t[1].drift.mean_kl, -t[1].drift.cosine_similarity), reverse=True)
        result.ranking = ranking
        current, kept = base_drift, []
        for unit, _ in ranking:
            if target.met(current, fp32_acc):
                break
            kept.append(unit)
            excluded = base_exclude | {n.name for n in graph.nodes if graph.units.get(n.name) in set(kept)}
            current = measure(sorted(excluded))
            result.steps.append((list(kept), current))
            log(f"sensitivity: float {', '.join(kept)} -> {current.describe()}")
        result.kept_float = kept
        result.met = target.met(current, fp32_acc)
    return result

