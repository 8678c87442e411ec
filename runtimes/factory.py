"""Open a runner by backend name, and say which backends can run here; backend libraries load only when asked."""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any, Literal

from partialnet.errors import UsageError

from .artifacts import one_line
from .base import Runner

Backend = Literal["onnxruntime", "openvino", "tensorrt"]
BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino", "tensorrt")


def open_runner(
    backend: Backend, path: str | Path, *, precision: str, threads: int | None = None, **options: Any
) -> Runner:
    """A runner for the artifact at `path`; `threads` applies to the CPU backends, `options` go to the runner.

    onnxruntime takes graph_optimization and device; openvino takes device, cache_dir and inference_precision.
    """
    if backend == "onnxruntime":
        from .ort import OrtRunner

        return OrtRunner(path, precision=precision, threads=threads, **options)
    if backend == "openvino":
        from .ov import OpenVINORunner

        return OpenVINORunner(path, precision=precision, threads=threads, **options)
    if backend == "tensorrt":
        from .trt import TensorRTRunner

        if threads is not None:
            raise UsageError(f"threads={threads} does not apply to tensorrt, which runs on the GPU; leave it unset.")
        return TensorRTRunner(path, precision=precision, **options)
    raise UsageError(f"unknown backend {backend!r}{_did_you_mean(str(backend))}; backends are {', '.join(BACKENDS)}.")


def backend_status() -> dict[str, str | None]:
    """For each backend, None if it can run on this machine, else a one-line reason it cannot."""
    from .trt import tensorrt_status

    return {
        "onnxruntime": _import_status("onnxruntime", "onnxruntime"),
        "openvino": _import_status("openvino", "OpenVINO"),
        "tensorrt": tensorrt_status(),
    }


def _import_status(module: str, label: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or OSError/RuntimeError from a broken native library
        return f"{label} failed to import ({one_line(e)}); reinstall it with `pip install -e .`."
    return None


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), BACKENDS, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
