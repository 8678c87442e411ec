"""The benchmark plot: p50 latency (or images/s) against top-1 agreement with eager, one marker per runner.

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


def latency_agreement_png(points: Sequence[PlotPoint], dest: str | Path, *, title: str, note: str = "",
                          mode: str = "latency") -> Path:
    """One panel per batch size, one marker per runner named in a shared legend (labels never print over each
    other); a log axis when a panel's values span more than 10x. Written atomically to `dest`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("nothing to plot: no points")
    sizes = sorted({p.batch_size for p in points})
    labels = list(dict.fromkeys(p.label for p in points))
    style = {label: (MARKERS[i % len(MARKERS)], f"C{i % 10}") for i, label in enumerate(labels)}
    fig = Figure(figsize=(4.0 * len(sizes) + 2.6, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    low = min(p.agreement for p in points) * 100
    handles = {}
    for ax, bs in zip(axes, sizes):
        group = [p for p in points if p.batch_size == bs]
        for p in group:
            marker, color = style[p.label]
            handles[p.label] = ax.scatter([p.latency_ms], [p.agreement * 100], marker=marker, color=color, s=48,
                                          zorder=3, alpha=0.85, label=p.label)
        values = [p.latency_ms for p in group]
        if min(values) > 0 and max(values) / min(values) > 10:
            ax.set_xscale("log")
        ax.margins(x=0.15)
        ax.set_ylim(min(low - 1.0, 99.0), 100.5)
        ax.set_title(f"batch {bs}", fontsize=9)
        ax.set_xlabel("p50 latency per request (ms)" if mode == "latency" else "images/s")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("top-1 agreement with eager (%)")
    fig.legend([handles[label] for label in labels], labels, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    if note:
        fig.supxlabel(note, fontsize=7, color="0.4")
    with atomic_path(Path(dest), force=True) as tmp:
        fig.savefig(tmp, format="png")
    return Path(dest)
