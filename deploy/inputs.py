"""Turning command-line inputs (image files or a preprocessed .npy) into one float32 NCHW batch."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from partialnet.errors import UsageError
from partialnet.preprocess import preprocess_files
from partialnet.variants import Preprocess


def load_npy(path: str | Path) -> np.ndarray:
    """The --inputs array, refused with one line when it is not a finite array with at least one row."""
    from partialnet.arrays import read_npy, require_finite

    arr = read_npy(path, f"--inputs {path}")
    require_finite(arr, f"--inputs {path}", "Preprocess the images again, or drop those rows.")
    return arr


def gather_inputs(images: Sequence[str], npy: str | None, pp: Preprocess) -> tuple[np.ndarray, list[str]]:
    """Return the batch and a display name per row."""
    if images and npy:
        raise UsageError("give images or --inputs X.npy, not both.")
    if npy:
        arr = load_npy(npy)
        n = arr.shape[0] if arr.ndim else 0
        return arr, [f"{Path(npy).name}[{i}]" for i in range(n)]
    if not images:
        raise UsageError("nothing to predict: give image files or --inputs X.npy.")
    return preprocess_files(images, pp), [str(p) for p in images]


def read_labels(path: str | Path, num_classes: int) -> list[str]:
    """One label per line, line i naming class i."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--labels {path} does not exist.")
    try:
        labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise UsageError(f"--labels {path} is not UTF-8 text with one label per line.") from e
    if len(labels) != num_classes:
        raise UsageError(f"--labels {path} has {len(labels)} labels but the model has {num_classes} classes.")
    return labels
