"""OpenVINO: ONNX -> IR conversion, and a runner that pins the inference precision it was asked for.

On CPUs with bf16 support OpenVINO computes FP32 models in bf16 unless told otherwise, so every runner sets
INFERENCE_PRECISION_HINT explicitly and reads back what the compiled model actually uses.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from partialnet.errors import DeployError, UsageError, WriteError
from partialnet.files import free_space, write_error

from .artifacts import load_failure, one_line, require_file
from .base import BackendUnavailable, TensorSpec, check_feeds
from .cpu import check_threads, int8_dot_saturates
from .telemetry import disable_openvino_telemetry

disable_openvino_telemetry()  # before anything here imports openvino

InferencePrecision = Literal["f32", "bf16", "f16"]

PRECISIONS = ("fp32", "bf16", "int8")
# What each artifact precision computes in by default. An int8 IR's quantized ops run in int8 whatever the hint;
# the hint decides the rest of the graph, which must stay f32 so only the quantization error shows up.
DEFAULT_INFERENCE_PRECISION: dict[str, InferencePrecision] = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
METADATA_RT_KEY = "partialnet"
# rt_info key of an INT8 IR saying which CPUs its weights are exact on: "any" (7-bit weights: no int8 dot product
# saturates) or "vnni" (full 8-bit weights: exact only with VNNI or AMX). See runtimes.cpu.
INT8_CPU_KEY = "partialnet.int8_cpu"


def convert_to_ir(onnx_path: str | Path, xml_dest: str | Path, *, force: bool = False) -> Path:
    """Convert an ONNX file to OpenVINO IR (.xml + .bin) with FP32 weights kept FP32; returns the .xml path.

    Both files are written into a temporary folder beside the destination and then renamed into place, so an
    interrupted conversion never leaves an IR that looks complete. The ONNX metadata_props are copied into the
    IR's rt_info under "partialnet".
    """
    import openvino as ov

    onnx_path = require_file(onnx_path, "ONNX file")
    xml_dest = Path(xml_dest)
    if xml_dest.suffix != ".xml":
        raise UsageError(f"OpenVINO IR destination {xml_dest} must end in .xml (the weights go beside it in .bin).")
    check_ir_destination(xml_dest, force)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:  # OpenVINO raises RuntimeError or its own GeneralFailure/OpConversionFailure types
        raise load_failure(onnx_path, "OpenVINO", e) from e
    for key, value in _onnx_metadata(onnx_path).items():
        model.set_rt_info(value, [METADATA_RT_KEY, key])
    save_ir(model, xml_dest, force=force)
    return xml_dest


def require_inference_precision(precision: str, device: str = "CPU") -> None:
    """Raise BackendUnavailable unless OpenVINO can compute in `precision` (an artifact precision) on `device`."""
    import openvino as ov

    wanted = DEFAULT_INFERENCE_PRECISION.get(precision, precision)
    if wanted == "f32":
        return
    core = ov.Core()
    if device not in core.available_devices:
        raise BackendUnavailable(f"OpenVINO {ov.__version__} has no device {device!r} here.")
    caps = [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]
    if wanted.upper() not in (c.upper() for c in caps):
        raise BackendUnavailable(
            f"OpenVINO on {device} here cannot compute in {wanted} (its capabilities: {', '.join(caps)}); "
            f"build the {precision} row on a CPU with {wanted} support (e.g. AVX512_BF16 or AMX)."
        )


def check_ir_destination(xml_dest: Path, force: bool) -> None:
    """Refuse to replace an existing .xml or .bin without force (checked before any slow work)."""
    for dest in (xml_dest, xml_dest.with_suffix(".bin")):
        if dest.exists() and not force:
            raise UsageError(f"{dest} exists; pass --force to overwrite it.")


def save_ir(model: Any, xml_dest: str | Path, *, force: bool = False) -> Path:
    """Save an IR pair with FP32 weights kept FP32, via a temporary folder beside it, then rename into place."""
    import openvino as ov

    xml_dest = Path(xml_dest)
    check_ir_destination(xml_dest, force)
    xml_dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{xml_dest.stem}.", suffix=".tmp", dir=xml_dest.parent))
    try:
        tmp_xml = tmp_dir / xml_dest.name
        try:
            ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        except Exception as e:  # a failed write surfaces as a C++ iostream error that names no cause
            raise WriteError(
                f"OpenVINO could not write the IR {xml_dest.name} into {xml_dest.parent} ({one_line(e)}); "
                f"{free_space(xml_dest.parent)} is free on that disk, and a full disk is the usual cause: free some "
                f"space (or choose another --output) and run again."
            ) from e
        # The .bin goes first: a reader opens the .xml, so the .xml appearing last marks the pair complete.
        try:
            os.replace(tmp_xml.with_suffix(".bin"), xml_dest.with_suffix(".bin"))
            os.replace(tmp_xml, xml_dest)
        except OSError as e:
            raise write_error(xml_dest, e) from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return xml_dest


def _onnx_metadata(onnx_path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


PerformanceHint = Literal["LATENCY", "THROUGHPUT"]


def compile_for(path: str | Path, *, precision: str = "fp32", device: str = "CPU", threads: int | None = None,
                cache_dir: str | Path | None = None, inference_precision: InferencePrecision | None = None,
                hint: PerformanceHint = "LATENCY", streams: int | None = None,
                batch: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Read and compile an OpenVINO model as a user deploys it: the performance hint set, the inference precision
    pinned and read back (never silently substituted). Returns (core, compiled model, options in effect).

    With `batch`, the inputs get that static batch size, as `benchmark_app -b N` compiles them: OpenVINO's CPU
    plugin runs a static shape markedly faster than a dynamic batch (benchmarks/DECISIONS.md). Without, the batch
    is dynamic."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise UsageError(f"openvino precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    wanted = inference_precision or DEFAULT_INFERENCE_PRECISION[precision]
    if wanted not in ("f32", "bf16", "f16"):
        raise UsageError(f"openvino inference precision {wanted!r} is not one of f32, bf16, f16.")
    check_threads(threads)

    core = ov.Core()
    available = list(core.available_devices)
    if device not in available:
        raise BackendUnavailable(
            f"OpenVINO {ov.__version__} has no device {device!r} here "
            f"(available: {', '.join(available) or 'none'}); "
            f"pick one of those, or install the driver/plugin for {device}."
        )
    path = require_file(path, "OpenVINO model")
    if path.suffix == ".xml":
        require_file(path.with_suffix(".bin"), "OpenVINO weights file")

    try:
        model = core.read_model(str(path))
    except Exception as e:
        raise load_failure(path, "OpenVINO", e) from e
    _set_batch(model, ov, batch)
    int8_cpu = _rt_info(model, INT8_CPU_KEY)
    if device == "CPU" and int8_cpu == "vnni" and int8_dot_saturates():
        raise BackendUnavailable(
            f"{path} is an INT8 IR with full-range 8-bit weights, exact only on CPUs with VNNI or AMX; this "
            f"CPU has neither, so its int8 dot products would saturate and the results drift far from FP32. "
            f"Re-export the INT8 artifacts with --int8-cpu any (or on this machine)."
        )

    config: dict[str, Any] = {ov.properties.hint.inference_precision: getattr(ov.Type, wanted),
                              ov.properties.hint.performance_mode: getattr(ov.properties.hint.PerformanceMode, hint)}
    if threads is not None:
        config[ov.properties.inference_num_threads] = threads
    if streams is not None:
        config[ov.properties.num_streams] = streams
    if batch is not None and device == "CPU":
        # Static shapes switch on the CPU plugin's "snippets" (generated subgraph kernels); on one Intel CPU with
        # AMX they changed FP32 logits by 0.26 in 7 (benchmarks/DECISIONS.md). Off, the static shape stays exact.
        config["SNIPPETS_MODE"] = "DISABLE"
    cache_note = None
    if cache_dir is not None:  # a read-only export still runs: the cache goes elsewhere, or is not used
        cache_dir, cache_note = usable_cache_dir(Path(cache_dir))
    if cache_dir is not None:
        core.set_property({ov.properties.cache_dir: str(cache_dir)})
    try:
        compiled = core.compile_model(model, device, config)
    except Exception as e:
        raise DeployError(
            f"OpenVINO could not compile {path} for {device} ({one_line(e)}); check that the model was "
            f"exported by this tool, or try another --device."
        ) from e

    in_effect = _type_name(compiled.get_property(ov.properties.hint.inference_precision))
    if in_effect != wanted:
        # OpenVINO substitutes a supported precision without telling; report it instead of measuring a lie.
        caps = ", ".join(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        raise BackendUnavailable(
            f"OpenVINO on {device} computes in {in_effect} although {wanted} was requested: this device does not "
            f"support {wanted} (its capabilities: {caps}); request a precision it supports."
        )
    options: dict[str, Any] = {
        "device": device,
        "device_name": core.get_property(device, "FULL_DEVICE_NAME"),
        "threads": int(compiled.get_property(ov.properties.inference_num_threads)),
        "streams": int(compiled.get_property(ov.properties.num_streams)),
        "performance_hint": hint,
        "inference_precision": in_effect,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "cache_note": cache_note,
        "int8_cpu": int8_cpu,
        "static_batch": batch,
    }
    return core, compiled, options


class _StaticShapes:
    """One compiled model per batch size, made on first use from the same options, the last MAX_SHAPES kept."""

    MAX_SHAPES = 4

    def __init__(self, path: str | Path, first_batch: int, **options: Any):
        self._compile = functools.partial(compile_for, path, **options)
        _, compiled, self.options = self._compile(batch=first_batch)
        self._compiled: OrderedDict[int, Any] = OrderedDict({first_batch: self._prepare(compiled)})
        self.first = compiled

    def _prepare(self, compiled: Any) -> Any:
        return compiled

    def get(self, batch: int) -> Any:
        if batch in self._compiled:
            self._compiled.move_to_end(batch)
        else:
            self._compiled[batch] = self._prepare(self._compile(batch=batch)[1])
            while len(self._compiled) > self.MAX_SHAPES:
                self._compiled.popitem(last=False)
        return self._compiled[batch]

    def batches(self) -> list[int]:
        return list(self._compiled)

    def clear(self) -> None:
        self._compiled.clear()
        self.first = None


class _Requests(_StaticShapes):
    def _prepare(self, compiled: Any) -> Any:
        return compiled, compiled.create_infer_request()


class _Queues(_StaticShapes):
    requests = 1

    def _prepare(self, compiled: Any) -> Any:
        import openvino as ov

        self.requests = int(compiled.get_property(ov.properties.optimal_number_of_infer_requests))
        return compiled, ov.AsyncInferQueue(compiled, self.requests)


class OpenVINORunner:
    """Runs an OpenVINO IR (.xml) or an .onnx file with OpenVINO on one device, at a pinned inference precision,
    under the LATENCY hint (one request at a time). Any batch size runs: each is compiled as a static shape on
    first use (the last four are kept), as `benchmark_app -b N` runs it."""

    def __init__(
        self,
        path: str | Path,
        *,
        precision: str = "fp32",
        device: str = "CPU",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        inference_precision: InferencePrecision | None = None,
    ):
        self._shapes = _Requests(path, 1, precision=precision, device=device, threads=threads, cache_dir=cache_dir,
                                 inference_precision=inference_precision)
        self.options = self._shapes.options
        self.options["static_batch"] = "per call"
        self.path = Path(path)
        self.name = f"openvino:{device.lower()}:{precision}"
        self.precision = precision
        self.device = device
        compiled = self._shapes.first
        self.inputs = [_spec(p, free_batch=True) for p in compiled.inputs]
        self.outputs = [_spec(p, free_batch=True) for p in compiled.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.inputs, feeds)
        compiled, request = self._shapes.get(int(feeds[self.inputs[0].name].shape[0]))
        result = request.infer({name: feeds[name] for name in (s.name for s in self.inputs)})
        return {spec.name: np.array(result[port]) for spec, port in zip(self.outputs, compiled.outputs)}

    def compiled_batches(self) -> list[int]:
        """The batch sizes compiled now, least recently used first."""
        return self._shapes.batches()

    def close(self) -> None:
        self._shapes.clear()


class OpenVINOStreams:
    """OpenVINO under the THROUGHPUT hint: an AsyncInferQueue with as many requests as OpenVINO asks for, on the
    streams it chooses (or `streams`), as benchmark_app -hint throughput runs it (a static shape per batch size)."""

    def __init__(self, path: str | Path, *, precision: str = "fp32", device: str = "CPU", threads: int | None = None,
                 streams: int | None = None, cache_dir: str | Path | None = None):
        self._shapes = _Queues(path, 1, precision=precision, device=device, threads=threads,
                               cache_dir=cache_dir, hint="THROUGHPUT", streams=streams)
        self.options = self._shapes.options
        self.requests = self._shapes.requests
        self.streams = self.options["streams"]
        self.options["requests"] = self.requests

    def run_for(self, x: np.ndarray, seconds: float):
        from .throughput import Sample

        compiled, queue = self._shapes.get(len(x))
        port = compiled.inputs[0]
        latencies: list[float] = []
        queue.set_callback(lambda request, started: latencies.append(time.perf_counter() - started))
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline or not latencies:
            queue.start_async({port: x}, time.perf_counter())  # waits for a free request
        queue.wait_all()
        return Sample(len(latencies), len(x), time.perf_counter() - start, tuple(latencies))

    def close(self) -> None:
        self._shapes.clear()


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)  # os.access is not enough (root, ACLs, ro mounts)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def usable_cache_dir(preferred: Path) -> tuple[Path | None, str | None]:
    """`preferred` if this process can write there; else a per-user cache folder for it; else None (no cache).

    The second value is the note to show once when the preferred folder could not be used (a read-only export).
    """
    if _writable_dir(preferred):
        return preferred, None
    import hashlib

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "partialnet-deploy" / "openvino"
    fallback = base / hashlib.sha256(str(preferred.resolve()).encode()).hexdigest()[:16]
    if _writable_dir(fallback):
        return fallback, f"{preferred} is not writable; OpenVINO caches compiled models in {fallback} instead"
    return None, f"{preferred} is not writable (nor {base}); OpenVINO compiles without a cache (a slower start)"


def _set_batch(model: Any, ov: Any, batch: int | None) -> None:
    """Give every input the batch size `batch` (None: a dynamic batch), keeping the other dimensions."""
    new_shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() > 0:
            dims = [ov.Dimension(-1 if batch is None else batch)] + [shape[i] for i in range(1, shape.rank.get_length())]
            new_shapes[port.get_any_name()] = ov.PartialShape(dims)
    if new_shapes:
        model.reshape(new_shapes)


def _rt_info(model: Any, key: str) -> str | None:
    """A string the export stamped into the IR's rt_info under "partialnet", or None."""
    path = [METADATA_RT_KEY, key]
    return str(model.get_rt_info(path).astype(str)) if model.has_rt_info(path) else None


def _type_name(element_type: Any) -> str:
    """OpenVINO's short element-type name: 'f32', 'bf16', 'f16'."""
    return element_type.get_type_name()


def _spec(port: Any, free_batch: bool = False) -> TensorSpec:
    shape = tuple(None if d.is_dynamic or (free_batch and i == 0) else d.get_length()
                  for i, d in enumerate(port.get_partial_shape()))
    return TensorSpec(port.get_any_name(), str(port.get_element_type().to_dtype()), shape)
