"""Top-k prediction with any runner."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from runtimes.base import Runner
from runtimes.compare import run_all


def run_batched(runner: Runner, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Logits for every row of x, in chunks of batch_size."""
    return run_all({"runner": runner}, x, batch_size)["runner"]


def require_finite_logits(logits: np.ndarray, names: Sequence[str], runner_name: str) -> None:
    """Refuse to print or save logits holding NaN or Inf (the inputs were checked finite when read)."""
    from partialnet.arrays import nonfinite_rows
    from partialnet.errors import DeployError

    rows = nonfinite_rows(logits)
    if len(rows):
        shown = ", ".join(names[i] for i in rows[:3]) + (", ..." if len(rows) > 3 else "")
        raise DeployError(
            f"{runner_name} produced NaN or Inf logits for {shown} ({len(rows)} of {len(logits)} inputs) from finite "
            f"inputs; nothing was printed or saved. Check the artifact against eager with 'deploy validate'."
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and softmax probabilities of the k largest logits per row, best first (ties by lower index)."""
    k = min(k, logits.shape[1])
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    probs = np.take_along_axis(softmax(logits), idx, axis=1)
    return idx, probs


def format_topk(names: Sequence[str], idx: np.ndarray, probs: np.ndarray, labels: Sequence[str] | None) -> str:
    lines = []
    for name, row_i, row_p in zip(names, idx, probs):
        picks = ", ".join(
            f"{i}" + (f" {labels[i]}" if labels else "") + f" ({p:.4f})" for i, p in zip(row_i.tolist(), row_p.tolist())
        )
        lines.append(f"{name}: {picks}")
    return "\n".join(lines)
