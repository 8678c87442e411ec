"""The one Runner protocol every backend implements, and the one place feeds are checked."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from partialnet.errors import DeployError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class InputError(DeployError):
    """A feed does not match the model's input: wrong name, dtype or shape."""

    exit_code = 2


class BackendUnavailable(DeployError):
    """A backend's library, device or provider is missing on this machine."""


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor; None in `shape` is a dynamic axis (the batch, or any spatial size for eager)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ", ".join("batch" if (d is None and i == 0) else ("any" if d is None else str(d)) for i, d in enumerate(self.shape))
        return f"{self.name!r} ({self.dtype} [{dims}])"


@runtime_checkable
class Runner(Protocol):
    name: str  # "backend:device:precision", e.g. "onnxruntime:cpu:int8"
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def check_feeds(specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray], *, multiple_of: int = 1) -> None:
    """Raise one InputError, worded the same for every backend, if feeds do not match the specs."""
    expected = ", ".join(s.describe() for s in specs)
    names = {s.name for s in specs}
    extra = [k for k in feeds if k not in names]
    missing = [s.name for s in specs if s.name not in feeds]
    if extra or missing:
        got = ", ".join(repr(k) for k in feeds) or "nothing"
        raise InputError(f"model inputs are {expected}; got {got}.")
    for spec in specs:
        arr = feeds[spec.name]
        if not isinstance(arr, np.ndarray):
            raise InputError(f"input {spec.name!r} must be a NumPy array, got {type(arr).__name__}; expected {spec.describe()}.")
        if arr.dtype != np.dtype(spec.dtype):
            raise InputError(
                f"input {spec.name!r} has dtype {arr.dtype}; expected {spec.describe()}. "
                f"Convert it with .astype(np.{spec.dtype})."
            )
        ok = arr.ndim == len(spec.shape) and all(d is None or d == a for d, a in zip(spec.shape, arr.shape))
        if ok and multiple_of > 1:
            ok = all(a % multiple_of == 0 and a > 0 for d, a in zip(spec.shape[2:], arr.shape[2:]) if d is None)
        if ok and arr.ndim and arr.shape[0] == 0:
            ok = False
        if not ok:
            dynamic_spatial = any(d is None for d in spec.shape[2:])
            extra_rule = f" with spatial sizes a multiple of {multiple_of}" if multiple_of > 1 and dynamic_spatial else ""
            raise InputError(
                f"input {spec.name!r} has shape {list(arr.shape)}; expected {spec.describe()}{extra_rule} "
                f"and at least one image."
            )
