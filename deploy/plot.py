"""The benchmark plot: p50 latency against top-1 agreement with eager, one labelled point per runner.

matplotlib is imported only here and only when a plot is drawn, through its Agg canvas directly (no pyplot, no
display, no global backend switch), so `deploy --help` stays fast and headless machines just work.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from partialnet.files import atomic_path

MARKERS = ("o", "s", "^", "D", "v", "P", "X")


@dataclass(frozen=True)
class PlotPoint:
    label: str  # "openvino bf16"
    latency_ms: float  # p50 per call
    agreement: float  # top-1 agreement with eager, a fraction
    batch_size: int


def latency_agreement_png(points: Sequence[PlotPoint], dest: str | Path, *, title: str, note: str = "") -> Path:
    """One panel per batch size, one labelled point per runner; the PNG is written atomically to `dest`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("nothing to plot: no points")
    sizes = sorted({p.batch_size for p in points})
    fig = Figure(figsize=(4.2 * len(sizes) + 1.0, 4.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    low = min(p.agreement for p in points) * 100
    for i, (ax, bs) in enumerate(zip(axes, sizes)):
        group = sorted((p for p in points if p.batch_size == bs), key=lambda p: p.latency_ms)
        lat = [p.latency_ms for p in group]
        ax.scatter(lat, [p.agreement * 100 for p in group], marker=MARKERS[i % len(MARKERS)], s=40, zorder=3)
        for j, p in enumerate(group):
            # Alternate above and below so that labels of nearby points (often all at 100%) do not overlap.
            ax.annotate(p.label, (p.latency_ms, p.agreement * 100), textcoords="offset points",
                        xytext=(4, 6 if j % 2 == 0 else -11), fontsize=7)
        if min(lat) > 0 and max(lat) / min(lat) > 10:
            ax.set_xscale("log")
        ax.margins(x=0.25)
        ax.set_ylim(min(low - 1.0, 99.0), 100.5)
        ax.set_title(f"batch {bs}", fontsize=9)
        ax.set_xlabel("p50 latency per call (ms)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("top-1 agreement with eager (%)")
    fig.suptitle(title, fontsize=10)
    if note:
        fig.supxlabel(note, fontsize=7, color="0.4")
    with atomic_path(Path(dest), force=True) as tmp:
        fig.savefig(tmp, format="png")
    return Path(dest)
