"""TensorRT: engine builds from ONNX, a runner on torch CUDA buffers, and the equivalent trtexec script.

Loading TensorRT on a machine without an NVIDIA GPU can take the whole process down, so `tensorrt` is never
imported at module import time, and only after a CUDA GPU has been seen without it. Every public entry point
that touches TensorRT goes through `require_tensorrt()`.
"""
from __future__ import annotations

import ctypes.util
import functools
import importlib
import importlib.util
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Mapping

import numpy as np

from partialnet.errors import DeployError, UsageError

from partialnet.files import EXEC_MODE, atomic_write_bytes

from .artifacts import ArtifactError, one_line, require_file
from .base import INPUT_NAME, BackendUnavailable, InputError, TensorSpec, check_feeds

# int8: from an explicit Q/DQ ONNX (TensorRT 10 and 11); int8-entropy: from the float ONNX with TensorRT 10's
# implicit-INT8 entropy calibrator (calibration/trt_calibrator.py), where that API still exists.
Precision = Literal["fp32", "fp16", "int8", "int8-entropy"]
PRECISIONS = ("fp32", "fp16", "int8", "int8-entropy")
MIN_MAJOR = 10
INSTALL_HINT = 'install it with `pip install -e ".[tensorrt]"` on a machine with an NVIDIA GPU and driver'
REBUILD_HINT = "rebuild it on this machine with `deploy export --backends tensorrt --force` or the build.sh beside it"
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class EngineBuildError(DeployError):
    """TensorRT could not parse the ONNX file or build an engine from it."""


# --------------------------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------------------------


def tensorrt_status() -> str | None:
    """None if TensorRT and a CUDA GPU are usable here, else a one-line reason naming what is missing."""
    return _probe()[1]


def require_tensorrt() -> ModuleType:
    """The imported `tensorrt` module, or BackendUnavailable with the reason it cannot be used here."""
    trt, reason = _probe()
    if trt is None:
        raise BackendUnavailable(reason)
    return trt


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[ModuleType | None, str | None]:
    reason = _gpu_missing()
    if reason is not None:
        return None, reason
    if importlib.util.find_spec("tensorrt") is None:
        return None, f"TensorRT is not installed in this Python ({sys.executable}); {INSTALL_HINT}."
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:  # a broken install raises ImportError, OSError (missing libnvinfer) or RuntimeError
        return None, f"TensorRT is installed but failed to import ({one_line(e)}); reinstall it: {INSTALL_HINT}."
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_MAJOR:
        return None, f"TensorRT {trt.__version__} is too old (this tool needs {MIN_MAJOR} or newer); {INSTALL_HINT}."
    return trt, None


def _gpu_missing() -> str | None:
    """Why no CUDA GPU is usable here, found without importing TensorRT; None when one is."""
    import torch

    if torch.cuda.is_available():
        return None
    if ctypes.util.find_library("cuda") is None and shutil.which("nvidia-smi") is None:
        return (
            "TensorRT is unavailable: no NVIDIA GPU driver was found here (no libcuda, no nvidia-smi); "
            f"TensorRT needs an NVIDIA GPU, so {INSTALL_HINT}."
        )
    if torch.version.cuda is None:
        return (
            f"TensorRT is unavailable: PyTorch {torch.__version__} here is a CPU-only build and the TensorRT runner "
            f"uses torch CUDA tensors as device buffers; install a CUDA build of PyTorch, then {INSTALL_HINT}."
        )
    return (
        "TensorRT is unavailable: an NVIDIA driver is installed but CUDA sees no usable GPU "
        "(check nvidia-smi and CUDA_VISIBLE_DEVICES); TensorRT needs one."
    )


def _gpu_name() -> str:
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def _make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that prints warnings and errors to stderr and keeps the errors for our messages."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

        def last_error(self) -> str:
            return self.errors[-1].strip().splitlines()[-1] if self.errors else "TensorRT gave no reason"

    return _Logger()


# --------------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built for: its precision, input size, batch range and build resources."""

    precision: Precision
    input_size: int
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 32
    timing_cache: Path | None = None
    workspace_gb: float = 4

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"tensorrt precision {self.precision!r} is not one of {', '.join(PRECISIONS)}.")
        if self.input_size < 1:
            raise UsageError(f"input_size must be positive, got {self.input_size}.")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(
                f"batch range min {self.min_batch}, opt {self.opt_batch}, max {self.max_batch} is invalid; "
                f"it needs 1 <= min <= opt <= max."
            )
        if self.workspace_gb <= 0:
            raise UsageError(f"workspace_gb must be positive, got {self.workspace_gb}.")

    @property
    def strongly_typed(self) -> bool:
        return self.precision == "int8"

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        one = (3, self.input_size, self.input_size)
        return (self.min_batch, *one), (self.opt_batch, *one), (self.max_batch, *one)


def build_engine(onnx_path: str | Path, plan_dest: str | Path, spec: EngineSpec, *, force: bool = False,
                 calibrator: Any = None) -> dict[str, Any]:
    """Build a serialized engine for `spec` and write it atomically; returns build info.

    fp32 and fp16 start from a float ONNX (fp16 lets TensorRT 10 choose FP16 kernels); int8 starts from an
    explicit Q/DQ ONNX parsed as a strongly typed network, so the quantization is exactly the calibrated one.
    TF32 is switched off: layers left in FP32 compute in FP32, as on the other backends.
    """
    trt = require_tensorrt()
    onnx_path = require_file(onnx_path, "ONNX file")
    plan_dest = Path(plan_dest)
    if plan_dest.exists() and not force:
        raise UsageError(f"{plan_dest} exists; pass --force to overwrite it.")
    _check_quantization_matches(onnx_path, spec.precision)
    if (spec.precision == "int8-entropy") != (calibrator is not None):
        raise UsageError("an int8-entropy engine needs a calibrator (calibration.trt_calibrator), and only it takes one.")
    if spec.precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16"):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} removed weakly typed FP16 builds (BuilderFlag.FP16), so an fp16 engine "
            f"needs an fp16 ONNX (python -m modelopt.onnx.autocast); build fp32 or int8 here, or use TensorRT 10."
        )

    started = time.perf_counter()
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path, spec)
    config = _builder_config(trt, builder, network, onnx_path, spec, calibrator)
    cache = _attach_timing_cache(config, spec.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not build an engine from {onnx_path} ({logger.last_error()}); "
            f"see the [TensorRT] lines above, or try a larger workspace_gb."
        )
    atomic_write_bytes(plan_dest, memoryview(serialized), force=force)
    if cache is not None and spec.timing_cache is not None:
        atomic_write_bytes(spec.timing_cache, memoryview(config.get_timing_cache().serialize()), force=True)

    return {
        "tensorrt": str(trt.__version__),
        "gpu": _gpu_name(),
        "engine_precision": spec.precision,
        "strongly_typed": spec.strongly_typed,
        "tf32": False,
        "input_size": spec.input_size,
        "batch": {"min": spec.min_batch, "opt": spec.opt_batch, "max": spec.max_batch},
        "workspace_gb": spec.workspace_gb,
        "timing_cache": str(spec.timing_cache) if spec.timing_cache is not None else None,
        "build_seconds": round(time.perf_counter() - started, 1),
    }


def _parse(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path, spec: EngineSpec) -> tuple[Any, Any]:
    """The parsed network, and its parser: the network uses the parser's weights, so both live until the build."""
    # TensorRT 10+ networks are always explicit-batch; the only creation flag left to choose is strong typing.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if spec.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT {trt.__version__}'s ONNX parser rejected {onnx_path} ({len(errors)} error(s), first: "
            f"{errors[0].splitlines()[0] if errors else logger.last_error()}); re-export it with a supported opset."
        )
    return network, parser


def _builder_config(trt: ModuleType, builder: Any, network: Any, onnx_path: Path, spec: EngineSpec,
                    calibrator: Any) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gb * (1 << 30)))
    if spec.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if calibrator is not None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)

    profile = builder.create_optimization_profile()
    lo, opt, hi = spec.shapes()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tuple(tensor.shape)[1:] != lo[1:]:
            raise EngineBuildError(
                f"{onnx_path} input {tensor.name!r} has shape {list(tensor.shape)} but input_size {spec.input_size} "
                f"needs [batch, 3, {spec.input_size}, {spec.input_size}]; export the ONNX at that size or pass its size."
            )
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if calibrator is not None:
        config.set_calibration_profile(profile)
    return config


def _attach_timing_cache(config: Any, timing_cache: Path | None) -> Any:
    if timing_cache is None:
        return None
    timing_cache = Path(timing_cache)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineBuildError(
            f"timing cache {timing_cache} was made by another TensorRT version or GPU and was rejected; delete "
            f"it (it is only a build-speed cache) and build again."
        )
    return cache


def _check_quantization_matches(onnx_path: Path, precision: str) -> None:
    """An int8 engine must come from a Q/DQ ONNX and a float engine from a float one, else the label would lie."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    qdq = sum(1 for node in proto.graph.node if node.op_type in _QDQ_OPS)
    if precision == "int8" and qdq == 0:
        raise EngineBuildError(
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes, so an int8 engine built from it would run "
            f"in float; build int8 from the calibrated Q/DQ ONNX instead."
        )
    if precision != "int8" and qdq > 0:  # fp32, fp16, and int8-entropy (calibrated by TensorRT itself)
        raise EngineBuildError(
            f"{onnx_path} is quantized ({qdq} Q/DQ nodes) but precision {precision} was asked; build it as int8, "
            f"or build {precision} from the float ONNX."
        )


# --------------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------------


class TensorRTRunner:
    """Runs a serialized TensorRT engine on the current CUDA GPU; NumPy in and out, torch CUDA tensors between."""

    def __init__(self, plan_path: str | Path, *, precision: Precision):
        trt = require_tensorrt()
        import torch

        if precision not in PRECISIONS:
            raise UsageError(f"tensorrt precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
        self.path = require_file(plan_path, "TensorRT engine")
        self._torch = torch
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        gpu = _gpu_name()
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ArtifactError(
                f"TensorRT {trt.__version__} on {gpu} could not load the engine {self.path} "
                f"({self._logger.last_error()}); an engine only runs with the TensorRT version and GPU that built "
                f"it, so {REBUILD_HINT}."
            )
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise DeployError(
                f"TensorRT could not create an execution context for {self.path} ({self._logger.last_error()}); "
                f"free GPU memory or {REBUILD_HINT}."
            )
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self._device)

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        specs = {n: _spec(trt, engine, n) for n in names}
        self.inputs = [specs[n] for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [specs[n] for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._batch_range: dict[str, tuple[int, int]] = {}
        for spec in self.inputs:
            lo_shape, _, hi_shape = engine.get_tensor_profile_shape(spec.name, 0)
            self._batch_range[spec.name] = (int(lo_shape[0]), int(hi_shape[0]))
        self.name = f"tensorrt:cuda:{precision}"
        self.precision = precision
        lo, hi = self._batch_range[self.inputs[0].name]
        self.options: dict[str, Any] = {"tensorrt": str(trt.__version__), "gpu": gpu, "batch_range": [lo, hi]}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.inputs, feeds)
        torch = self._torch
        ctx = self._context
        keep: list[Any] = []  # input buffers must outlive the work enqueued on the stream
        with torch.cuda.stream(self._stream):
            for spec in self.inputs:
                arr = np.ascontiguousarray(feeds[spec.name])
                lo, hi = self._batch_range[spec.name]
                if not lo <= arr.shape[0] <= hi or not ctx.set_input_shape(spec.name, tuple(arr.shape)):
                    raise InputError(
                        f"input {spec.name!r} has batch {arr.shape[0]}, but {self.path.name} was built for batches "
                        f"{lo} to {hi}; feed {lo} to {hi} images per run, or rebuild it with a wider batch range."
                    )
                tensor = torch.from_numpy(arr).to(self._device)
                ctx.set_tensor_address(spec.name, tensor.data_ptr())
                keep.append(tensor)
            results = {}
            for spec in self.outputs:
                shape = tuple(ctx.get_tensor_shape(spec.name))
                tensor = torch.empty(shape, dtype=getattr(torch, spec.dtype), device=self._device)
                ctx.set_tensor_address(spec.name, tensor.data_ptr())
                results[spec.name] = tensor
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise DeployError(f"TensorRT failed to run {self.path} ({self._logger.last_error()}).")
            host = {name: t.cpu() for name, t in results.items()}
        self._stream.synchronize()
        return {name: t.numpy() for name, t in host.items()}

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None


def _spec(trt: ModuleType, engine: Any, name: str) -> TensorSpec:
    dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
    shape = tuple(None if d < 0 else int(d) for d in engine.get_tensor_shape(name))
    return TensorSpec(name, dtype, shape)


# --------------------------------------------------------------------------------------------------------
# trtexec script
# --------------------------------------------------------------------------------------------------------


def write_build_script(dest: str | Path, onnx_rel: str, plan_rel: str, spec: EngineSpec, *,
                       timing_cache_rel: str = "timing.cache", force: bool = False) -> Path:
    """Write an executable build.sh that rebuilds the engine with `trtexec`, equivalent to build_engine.

    Needs no TensorRT here: the script is for the machine that will run the engine. Paths are relative to the
    script's folder.
    """
    if spec.precision == "int8-entropy":
        raise UsageError("trtexec cannot run the entropy calibrator; build the int8 engine from the Q/DQ ONNX.")
    dims = f"3x{spec.input_size}x{spec.input_size}"
    args = [
        "trtexec",
        f"--onnx={onnx_rel}",
        f"--saveEngine={plan_rel}",
        f"--minShapes={INPUT_NAME}:{spec.min_batch}x{dims}",
        f"--optShapes={INPUT_NAME}:{spec.opt_batch}x{dims}",
        f"--maxShapes={INPUT_NAME}:{spec.max_batch}x{dims}",
        {"fp32": None, "fp16": "--fp16", "int8": "--stronglyTyped"}[spec.precision],
        "--noTF32",
        f"--memPoolSize=workspace:{int(spec.workspace_gb * 1024)}",
        f"--timingCacheFile={timing_cache_rel}",
    ]
    command = " \\\n    ".join(shlex.quote(a) for a in args if a is not None)
    text = (
        "#!/usr/bin/env bash\n"
        f"# Rebuilds {plan_rel} ({spec.precision}, batch {spec.min_batch}..{spec.max_batch}, "
        f"{spec.input_size}x{spec.input_size}) from {onnx_rel}\n"
        "# with trtexec, as `deploy export --backends tensorrt` does. Run it on the GPU that will run the engine:\n"
        "# an engine is tied to its TensorRT version and GPU."
        + (" TensorRT 11 removed --fp16; there, build from an fp16 ONNX." if spec.precision == "fp16" else "")
        + "\nset -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f"{command}\n"
    )
    return atomic_write_bytes(dest, text.encode("utf-8"), force=force, mode=EXEC_MODE)
