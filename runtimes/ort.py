"""ONNX Runtime runner: one InferenceSession on exactly the provider asked for."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from partialnet.errors import UsageError

from .artifacts import load_failure, require_file
from .base import BackendUnavailable, TensorSpec, check_feeds
from .cpu import check_threads, int8_dot_saturates
from .telemetry import disable_onnxruntime_telemetry

disable_onnxruntime_telemetry()  # before anything here imports onnxruntime

GraphOptimization = Literal["all", "extended", "basic", "disabled"]
Device = Literal["cpu", "cuda"]

PRECISIONS = ("fp32", "fp16", "int8")
# ONNX Runtime's switch from U8S8 to U8U8 int8 kernels (kOrtSessionOptionsAvx2PrecisionMode); see runtimes.cpu.
EXACT_INT8_KEY = "session.x64quantprecision"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


class OrtRunner:
    """Runs an .onnx file with ONNX Runtime; `precision` names what the file holds (an int8 file is Q/DQ)."""

    def __init__(
        self,
        path: str | Path,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        graph_optimization: GraphOptimization = "all",
        device: Device = "cpu",
        spinning: bool = True,
        exact_int8: bool | None = None,
    ):
        """`spinning=False` stops idle worker threads from busy-waiting: needed when several runtimes share the
        cores in one interleaved benchmark, where a spinning session steals time from the next one.

        `exact_int8` (default: on for an int8 file on an x86 CPU without VNNI) makes ONNX Runtime use its U8U8
        kernels, which do not saturate, instead of U8S8 (runtimes.cpu). ONNX Runtime applies it only on x86; it
        rewrites the int8 weights to uint8 when the session loads, so it costs a little speed and no accuracy.
        """
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise UsageError(f"onnxruntime precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
        if device not in PROVIDERS:
            raise UsageError(f"onnxruntime device {device!r} is not one of {', '.join(PROVIDERS)}.")
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if graph_optimization not in levels:
            raise UsageError(
                f"onnxruntime graph optimization {graph_optimization!r} is not one of {', '.join(levels)}."
            )
        check_threads(threads)

        provider = PROVIDERS[device]
        available = ort.get_available_providers()
        if provider not in available:
            raise BackendUnavailable(
                f"onnxruntime {ort.__version__} here has no {provider} (it has {', '.join(available)}); "
                + ("install onnxruntime-gpu on a machine with an NVIDIA GPU and a matching CUDA, or run on the CPU."
                   if device == "cuda" else "reinstall onnxruntime.")
            )
        self.path = require_file(path, "ONNX file")

        so = ort.SessionOptions()
        so.graph_optimization_level = levels[graph_optimization]
        if threads is not None:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if exact_int8 is None:
            exact_int8 = precision == "int8" and device == "cpu" and int8_dot_saturates()
        if exact_int8:
            so.add_session_config_entry(EXACT_INT8_KEY, "1")
        so.log_severity_level = 3  # errors only: warnings go to stderr unasked and say nothing actionable here
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=[provider])
        except Exception as e:  # ORT raises its own pybind exception types, all derived from Exception
            raise load_failure(self.path, "onnxruntime", e) from e
        active = self._session.get_providers()
        if active[0] != provider:
            # ORT logs and continues on the CPU when a GPU provider fails to initialise; that is not what was asked.
            raise BackendUnavailable(
                f"onnxruntime could not start {provider} (active providers: {', '.join(active)}); check the NVIDIA "
                f"driver and the CUDA/cuDNN libraries onnxruntime-gpu {ort.__version__} needs, or run on the CPU."
            )

        self.name = f"onnxruntime:{device}:{precision}"
        self.precision = precision
        self.device = device
        self.inputs = [_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_spec(a) for a in self._session.get_outputs()]
        self._output_names = [s.name for s in self.outputs]
        self.options: dict[str, Any] = {
            "threads": threads,
            "graph_optimization": graph_optimization,
            "providers": active,
            "spinning": spinning,
            "exact_int8": exact_int8,
        }

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.inputs, feeds)
        values = self._session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        self._session = None


def _spec(arg: Any) -> TensorSpec:
    """TensorSpec of an ORT NodeArg; symbolic or unknown dimensions become None."""
    dtype = _ORT_DTYPES.get(arg.type, arg.type)
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorSpec(arg.name, dtype, shape)
