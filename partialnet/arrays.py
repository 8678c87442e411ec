"""Arrays entering from outside (a preprocessed .npy, a state dict) and leaving (logits), checked once here.

A NaN or Inf propagates through every layer and then passes any comparison that tests `err > limit`, so the
values are checked where they enter and where they leave, and the message says which rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import UsageError

NPY_MAGIC = b"\x93NUMPY"
_ROWS = 256  # rows checked at a time


def nonfinite_rows(arr: np.ndarray) -> np.ndarray:
    """Indices along axis 0 of the rows holding a NaN or an Inf (every index when `arr` is 0-d and not finite)."""
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.inexact):
        return np.zeros(0, np.int64)
    if a.ndim == 0:
        return np.zeros(0, np.int64) if np.isfinite(a) else np.zeros(1, np.int64)
    found = [i + np.flatnonzero(~np.isfinite(a[i : i + _ROWS].reshape(len(a[i : i + _ROWS]), -1)).all(axis=1))
             for i in range(0, len(a), _ROWS)]  # in chunks: a memory-mapped array is never read whole
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def describe_rows(rows: np.ndarray, total: int, limit: int = 5) -> str:
    """'rows 1, 4 (2 of 64)': the first few row indices and how many there are."""
    shown = ", ".join(str(int(i)) for i in rows[:limit]) + (", ..." if len(rows) > limit else "")
    return f"row{'s' if len(rows) > 1 else ''} {shown} ({len(rows)} of {total})"


def count_nonfinite(arr: np.ndarray) -> tuple[int, int]:
    """(NaN count, Inf count) in `arr`."""
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.inexact):
        return 0, 0
    if a.ndim == 0:
        return int(np.isnan(a)), int(np.isinf(a))
    chunks = [a[i : i + _ROWS] for i in range(0, len(a), _ROWS)]
    return sum(int(np.isnan(c).sum()) for c in chunks), sum(int(np.isinf(c).sum()) for c in chunks)


def require_finite(arr: np.ndarray, what: str, fix: str) -> None:
    """Raise a UsageError naming the rows of `arr` that hold NaN or Inf; `what` names the array, `fix` what to do."""
    rows = nonfinite_rows(arr)
    if len(rows):
        nan, inf = count_nonfinite(arr)
        raise UsageError(f"{what} holds {nan} NaN and {inf} Inf value(s) in {describe_rows(rows, len(arr))}; "
                         f"every value must be finite. {fix}")


def nonfinite_tensors(tensors: Mapping[str, "object"]) -> list[tuple[str, int, int]]:
    """(name, NaN count, Inf count) of every floating-point torch tensor in `tensors` that is not all finite."""
    import torch

    out = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            out.append((name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum())))
    return out


def describe_tensors(bad: list[tuple[str, int, int]], limit: int = 3) -> str:
    shown = ", ".join(f"{n} ({nan} NaN, {inf} Inf)" for n, nan, inf in bad[:limit])
    return shown + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def _what_it_looks_like(head: bytes) -> str:
    from .files import sniff_format

    kind = sniff_format(head)
    return f"it looks like {kind}" if kind else f"it starts with {head[:8]!r}"


def read_npy(path: str | Path, what: str, *, mmap: bool = False) -> np.ndarray:
    """One array from a .npy file, read without unpickling; every way it can be wrong is one UsageError.

    `what` names the argument in messages ("--inputs x.npy"). Refuses a file that is not .npy, an object array
    (pickled Python objects), a truncated file and an array with no rows. With `mmap` the data stays on disk.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} does not exist." if not path.exists() else f"{what} is a folder, not a .npy file.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        raise UsageError(f"{what} is an .npz archive (several arrays); save one float32 NCHW array with np.save.")
    if not head.startswith(NPY_MAGIC):
        raise UsageError(f"{what} is not a NumPy .npy file ({_what_it_looks_like(head)}); save a preprocessed float32 "
                         f"NCHW array with np.save.")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise UsageError(f"{what} has a damaged .npy header ({e}); save the array again with np.save.") from e
    if dtype.hasobject:
        raise UsageError(f"{what} holds Python objects (dtype {dtype}), which would have to be unpickled to read; "
                         f"save a plain float32 NCHW array with np.save.")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        expected = int(np.prod(shape)) * dtype.itemsize
        raise UsageError(f"{what} is truncated or damaged: its header says {dtype} {list(shape)} ({expected} bytes of "
                         f"data), which the file does not hold ({e}). Copy or save it again.") from e
    if arr.ndim == 0 or len(arr) == 0:
        raise UsageError(f"{what} holds {dtype} {list(arr.shape)}: no images; expected at least one row.")
    return arr
