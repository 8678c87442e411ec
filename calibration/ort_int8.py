"""Static INT8 with onnxruntime.quantization in QDQ format: calibration once (cached, keyed), quantization many times.

`QuantSession` pre-processes the float ONNX (`quant_pre_process`; if that fails the original graph is used and the
failure recorded), calibrates activation ranges over an ImageSet once (minmax, entropy or percentile, stored in a
keyed cache) and then quantizes with any node exclusions, which is what the sensitivity pass needs. `quantize_ort`
builds the CPU artifact, `calibration.qdq.build_qdq` the symmetric explicit-Q/DQ ONNX for TensorRT, both from the
same ranges and the same policy.

The CPU scheme (measurements: benchmarks/DECISIONS.md): uint8 asymmetric activations x int8 symmetric per-channel
weights (U8S8, the VNNI kernel); only Conv, MatMul and Gemm quantized (int8 elementwise kernels measured slower
than the float ops plus the Q/DQ they would save); GELU fused and PAT_sp's gate row stretched over its conv's
8-bit grid before quantization (calibration.rewrites).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import onnx

from partialnet.errors import DeployError, UsageError, first_line
from partialnet.files import atomic_path

from .cache import CacheKey, KeyedCache
from .policy import DEFAULT_POLICY, FloatPolicy, OnnxGraph
from .rewrites import (
    fuse_gelu,
    rescale_gate_rows,
    split_gate_rows,
    unshare_float_consumers,
    unshare_weight_dequantizers,
)
from .sources import ImageSet

METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
PERCENTILE = 99.999
CALIBRATED_OPS: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
INPUT_NAME = "input"
BATCH = 8  # images per calibration run
CHUNK = 4  # runs whose intermediate outputs are held in memory before their ranges are merged


class QuantizationError(DeployError):
    """Quantizing or calibrating a model failed."""


@dataclass(frozen=True)
class Scheme:
    """How activations and weights are quantized and which ops get Q/DQ."""

    name: str
    activation_type: Literal["uint8", "int8"]
    activation_symmetric: bool
    op_types: tuple[str, ...]
    quantize_outputs: bool  # Q/DQ on outputs of weighted ops too (needed for ORT's QLinearConv fusion)
    quantize_bias: bool  # int32 bias through DequantizeLinear (TensorRT wants float bias)
    fuse_gelu: bool  # com.microsoft.Gelu: onnxruntime only
    gate: Literal["merged", "split", "rescaled"]  # PAT_sp's gate-logit row: see calibration.rewrites

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "activations": f"{self.activation_type} {'symmetric' if self.activation_symmetric else 'asymmetric'} per-tensor",
            "weights": "int8 symmetric per-channel",
            "quantized_op_types": list(self.op_types),
            "qdq_on_outputs": self.quantize_outputs,
            "bias": "int32" if self.quantize_bias else "float",
            "gelu_fused": self.fuse_gelu,
            "gate_row": self.gate,
        }


CPU_SCHEME = Scheme("onnxruntime-cpu", "uint8", False, CALIBRATED_OPS, True, True, True, "rescaled")
# Conv outputs carry no Q/DQ in the TensorRT placement, so the merged gate row needs no treatment there.
TENSORRT_SCHEME = Scheme("tensorrt-explicit-qdq", "int8", True, CALIBRATED_OPS, False, False, False, "merged")
# What calibration runs on: the gate rows split off, so every tensor either scheme quantizes is observed and the
# merged conv's output range is the features' alone (rescale_gate_rows reads it).
CALIBRATION_SCHEME = Scheme("calibration", "uint8", False, CALIBRATED_OPS, True, True, False, "split")


def _calibration_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    if method not in METHODS:
        raise UsageError(f"calibration method {method!r} is not one of {', '.join(METHODS)}.")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def make_reader(images: np.ndarray, batch: int = BATCH) -> Any:
    """An onnxruntime CalibrationDataReader feeding `images` (float32 NCHW) in batches under the input name."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._start = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._start >= len(images):
                return None
            chunk = np.ascontiguousarray(images[self._start : self._start + batch], dtype=np.float32)
            self._start += batch
            return {INPUT_NAME: chunk}

        def rewind(self) -> None:
            self._start = 0

        def __len__(self) -> int:
            return (len(images) + batch - 1) // batch

    return _Reader()


def check_calibration_set(calib: ImageSet, input_size: int | None = None) -> None:
    """Raise a UsageError unless `calib` holds float32 NCHW RGB images (of `input_size` when given)."""
    x = calib.images
    if len(calib) == 0:
        raise UsageError(f"the calibration set ({calib.source}) is empty; give at least one image.")
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1] != 3:
        raise UsageError(f"calibration images must be float32 [N, 3, H, W]; got {x.dtype} {list(x.shape)}.")
    if input_size is not None and x.shape[2:] != (input_size, input_size):
        raise UsageError(
            f"calibration images are {x.shape[2]}x{x.shape[3]} but the model takes {input_size}x{input_size}; "
            f"preprocess them at the model's input size."
        )


def model_input_size(model: onnx.ModelProto) -> int:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[2].dim_value)


# --------------------------------------------------------------------------------------------------------
# pre-processing
# --------------------------------------------------------------------------------------------------------


def _name_new_nodes(path: Path) -> int:
    """Name the nodes pre-processing created without one (HardSwish decomposed into HardSigmoid and Mul): the
    float policy finds nodes by name. Each takes its producer's name plus its op, so it stays in that scope."""
    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    taken = {n.name for n in proto.graph.node}
    count = 0
    for node in proto.graph.node:
        if node.name:
            continue
        parent = next((producer[i].name for i in node.input if i in producer and producer[i].name), "")
        base = f"{parent.rsplit('/', 1)[0] if parent else ''}/{node.op_type}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        count += 1
    if count:
        onnx.save(proto, str(path))
    return count


def pre_process(src: Path, dest: Path) -> dict[str, Any]:
    """onnxruntime's quantization pre-processing (shape inference, basic optimizations) from src to dest.

    ONNX Runtime's symbolic shape inference fails on some graphs that ONNX's own shape inference handles (a Concat
    in tests/data/mynet.py, a user's model with coordinate attention): then the pre-processing runs again without
    it. If that fails too, dest is a copy of src and the record says why: quantization still works, ORT
    just warns.
    """
    # shape inference and the optimizer raise many exception types on unusual graphs
    try:
        return _pre_process_with(src, dest, skip_symbolic_shape=False)
    except Exception as first:
        try:
            info = _pre_process_with(src, dest, skip_symbolic_shape=True)
        except Exception as e:
            shutil.copyfile(src, dest)
            return {"applied": False, "reason": f"quant_pre_process failed ({first_line(e)}); quantized without it"}
        return {**info, "symbolic_shape_inference": f"skipped: it failed ({first_line(first)})"}


def _pre_process_with(src: Path, dest: Path, *, skip_symbolic_shape: bool) -> dict[str, Any]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        quant_pre_process(str(src), str(dest), skip_symbolic_shape=skip_symbolic_shape)
    onnx.checker.check_model(str(dest))
    named = _name_new_nodes(dest)
    return {"applied": True, "tool": "onnxruntime.quantization.shape_inference.quant_pre_process",
            **({"nodes_named": named} if named else {})}


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's logging.warning chatter (pre-processing advice, progress prints)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------------------------------------
# the session
# --------------------------------------------------------------------------------------------------------


@dataclass
class QuantSession:
    """One float ONNX, pre-processed once and calibrated once, quantized as often as asked.

    `workdir` holds the pre-processed graphs; `cache_dir` (default: workdir) the keyed range caches, so a
    calibration is reused across runs only for the same model bytes, calibration set, preprocessing and method.
    """

    onnx_path: Path
    calib: ImageSet
    method: str = "minmax"
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    workdir: Path | None = None
    cache_dir: Path | None = None
    log: Callable[[str], None] = lambda msg: None

    def __post_init__(self) -> None:
        self.onnx_path = Path(self.onnx_path)
        if not self.onnx_path.is_file():
            raise UsageError(f"ONNX model {self.onnx_path} does not exist; run 'deploy export' first.")
        _calibration_method(self.method)
        source = onnx.load(str(self.onnx_path), load_external_data=False)
        self.input_size = model_input_size(source)
        check_calibration_set(self.calib, self.input_size)
        self._own_workdir = self.workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="partialnet-int8-")) if self.workdir is None else Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else self.workdir
        self.prepared = self.workdir / "prepared.onnx"
        self.pre_processing = pre_process(self.onnx_path, self.prepared)
        if not self.pre_processing["applied"]:
            self.log(f"note: {self.pre_processing['reason']}")
        self._prepared: dict[tuple[bool, str], tuple[Path, dict[str, int]]] = {}
        self._ranges: KeyedCache | None = None
        self.cache_status: str | None = None

    def close(self) -> None:
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "QuantSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def calibration_info(self) -> dict[str, Any]:
        return {
            "method": self.method + (f" ({PERCENTILE} percentile)" if self.method == "percentile" else ""),
            "source": self.calib.source,
            "size": len(self.calib),
            "skipped_images": len(self.calib.skipped),
            "user_data": self.calib.user_data,
            "range_cache": self.cache_status,
        }

    def graph(self, scheme: Scheme) -> tuple[Path, OnnxGraph]:
        """The float graph this scheme quantizes (GELU fused or not, gate row merged, split or rescaled)."""
        key = (scheme.fuse_gelu, scheme.gate)
        if key not in self._prepared:
            counts = {"gelu_fused": 0, "gate_rows_split": 0, "gate_rows_rescaled": 0}
            path = self.prepared
            if scheme.fuse_gelu or scheme.gate != "merged":
                proto = onnx.load(str(self.prepared))
                if scheme.fuse_gelu:
                    counts["gelu_fused"] = fuse_gelu(proto)
                if scheme.gate == "split":
                    counts["gate_rows_split"] = split_gate_rows(proto)
                elif scheme.gate == "rescaled":
                    counts["gate_rows_rescaled"] = rescale_gate_rows(proto, self.range_values())
                path = self.workdir / f"prepared.{'gelu.' if scheme.fuse_gelu else ''}{scheme.gate}.onnx"
                onnx.save(proto, str(path))
            self._prepared[key] = (path, counts)
        path, _ = self._prepared[key]
        return path, OnnxGraph(onnx.load(str(path)))

    def range_values(self) -> dict[str, tuple[float, float]]:
        """Calibrated (min, max) of every observed tensor."""
        from onnxruntime.quantization.calibrate import load_tensors_data

        data = load_tensors_data(self.ranges().path)
        return {name: (float(np.min(d.range_value[0])), float(np.max(d.range_value[1]))) for name, d in data.items()}

    def ranges(self) -> KeyedCache:
        """The keyed activation-range cache, calibrating now if it is missing or stale."""
        if self._ranges is not None:
            return self._ranges
        from onnxruntime.quantization import calibrate

        if not hasattr(calibrate, "save_tensors_data"):
            import onnxruntime

            raise QuantizationError(
                f"onnxruntime {onnxruntime.__version__} has no calibration-range cache (save_tensors_data); "
                f"upgrade onnxruntime to the version pinned in pyproject.toml."
            )
        key = CacheKey.of(self.onnx_path, self.calib, self.preprocess, method=self.method,
                          percentile=PERCENTILE if self.method == "percentile" else None,
                          op_types=list(CALIBRATED_OPS), pre_processed=self.pre_processing["applied"],
                          graph_rewrites=["split_gate_rows"],
                          onnxruntime=_ort_version())
        cache = KeyedCache(Path(self.cache_dir) / f"ort_ranges.{self.method}.json", key)
        self.cache_status = cache.prepare()
        if self.cache_status != "hit":
            self.log(f"calibrating activation ranges ({self.method}) on {len(self.calib)} images")
            data = self._calibrate()
            calibrate.save_tensors_data(data, cache.path)
            cache.commit()
        self._ranges = cache
        return cache

    def _calibrate(self) -> Any:
        from onnxruntime.quantization.calibrate import create_calibrator

        options: dict[str, Any] = {}
        if self.method == "percentile":
            options = {"percentile": PERCENTILE, "symmetric": False}
        # The histogram calibrators print progress on stdout, which belongs to results: send it to stderr.
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp, _quiet(), contextlib.redirect_stdout(sys.stderr):
            try:
                # Calibrate the graph with PAT_sp's gate rows split off: it holds every tensor either scheme
                # quantizes, and the merged conv's own output range without the gate logit in it.
                path, _ = self.graph(CALIBRATION_SCHEME)
                calibrator = create_calibrator(
                    path, list(CALIBRATED_OPS), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=_calibration_method(self.method), extra_options=options,
                    providers=["CPUExecutionProvider"],
                )
                # The histogram collectors stack one array per run, so every run must have the same batch size.
                batch = BATCH if self.method == "minmax" else 1
                step = batch * CHUNK
                for start in range(0, len(self.calib), step):
                    calibrator.collect_data(make_reader(self.calib.images[start : start + step], batch))
                return calibrator.compute_data()
            except Exception as e:  # the calibrator raises ValueError/RuntimeError/ORT errors
                raise QuantizationError(f"calibration ({self.method}) failed: {type(e).__name__}: {e}") from e

    def quantize(self, dest: Path, scheme: Scheme, exclude: Sequence[str] = (), include: Sequence[str] | None = None) -> dict[str, Any]:
        """Quantize to `dest` (overwritten) with the cached ranges; returns Q/DQ counts and what stayed float."""
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        path, graph = self.graph(scheme)
        if include is not None and not include:
            raise UsageError("include names no node; pass None to quantize every node the scheme covers.")
        unknown = [n for n in list(exclude) + list(include or []) if n not in graph.by_name]
        if unknown:
            raise UsageError(f"{len(unknown)} node(s) to exclude/include are not in the graph, e.g. {unknown[0]!r}.")
        cache = self.ranges()
        act = QuantType.QUInt8 if scheme.activation_type == "uint8" else QuantType.QInt8
        extra = {
            "ActivationSymmetric": scheme.activation_symmetric,
            "WeightSymmetric": True,
            "QuantizeBias": scheme.quantize_bias,
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            "OpTypesToExcludeOutputQuantization": [] if scheme.quantize_outputs else list(scheme.op_types),
        }
        try:
            with _quiet():
                quantize_static(
                    str(path), str(dest), make_reader(self.calib.images), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(scheme.op_types), per_channel=True, reduce_range=False,
                    activation_type=act, weight_type=QuantType.QInt8, nodes_to_quantize=list(include or []),
                    nodes_to_exclude=list(exclude), calibrate_method=_calibration_method(self.method),
                    extra_options=extra, calibration_cache_path=str(cache.path),
                )
        except Exception as e:  # quantize_static raises ValueError/KeyError/RuntimeError on odd graphs
            raise QuantizationError(f"onnxruntime quantize_static failed: {type(e).__name__}: {e}") from e
        weighted = [n for n in graph.nodes if n.op_type in scheme.op_types]
        excluded_set = set(exclude)
        quantized = {n.name for n in weighted if n.name not in excluded_set and (include is None or n.name in include)}
        proto = onnx.load(str(dest))
        rewired = unshare_float_consumers(proto, quantized)
        weight_copies = unshare_weight_dequantizers(proto)
        if rewired or weight_copies:
            onnx.save(proto, str(dest))
        ops = Counter(n.op_type for n in proto.graph.node)
        return {
            "scheme": scheme.to_dict(),
            "quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0),
            "weighted_ops": len(weighted),
            "weighted_ops_float": len(weighted) - len(quantized),
            "float_inputs_unshared": rewired,
            "weight_copies": weight_copies,
            "excluded_nodes": len(exclude),
            **self._prepared[(scheme.fuse_gelu, scheme.gate)][1],
        }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --------------------------------------------------------------------------------------------------------
# the CPU artifact
# --------------------------------------------------------------------------------------------------------


def write_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Replace the file's metadata_props by `metadata` (keeping any key not given)."""
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(metadata)
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))


def source_metadata(onnx_path: Path) -> dict[str, str]:
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def quantize_ort(
    onnx_path: str | Path,
    dest: str | Path,
    calib: ImageSet,
    *,
    policy: FloatPolicy = DEFAULT_POLICY,
    method: str = "minmax",
    preprocess: Mapping[str, Any] | None = None,
    session: QuantSession | None = None,
    cache_dir: Path | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Static INT8 (QDQ, U8S8, per-channel) of `onnx_path` for onnxruntime on CPU, written atomically to `dest`.

    Returns what was done: scheme, calibration (method, source, size), pre-processing, the policy and the nodes it
    kept in float, Q/DQ counts. `session` reuses an existing calibration (the sensitivity pass makes one).
    """
    return write_quantized(onnx_path, dest, calib, CPU_SCHEME, "int8", policy=policy, method=method,
                           preprocess=preprocess, session=session, cache_dir=cache_dir, metadata=metadata,
                           force=force, log=log)


def write_quantized(
    onnx_path: str | Path,
    dest: str | Path,
    calib: ImageSet,
    scheme: Scheme,
    precision: str,
    *,
    policy: FloatPolicy,
    method: str,
    preprocess: Mapping[str, Any] | None,
    session: QuantSession | None,
    cache_dir: Path | None,
    metadata: Mapping[str, str] | None,
    force: bool,
    log: Callable[[str], None],
    check: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Quantize with one scheme and the policy's exclusions, stamp the metadata, check, and rename into place.

    `check(tmp)` may inspect the file before it is renamed (its result is returned as "structure").
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise UsageError(f"{dest} exists; pass --force to overwrite it.")
    own = session is None
    session = session or QuantSession(Path(onnx_path), calib, method, dict(preprocess or {}), cache_dir=cache_dir, log=log)
    try:
        _, graph = session.graph(scheme)
        exclude = policy.onnx_nodes_to_exclude(graph)
        with atomic_path(dest, force=force) as tmp:
            info = session.quantize(tmp, scheme, exclude)
            meta = {**source_metadata(session.onnx_path), **(metadata or {})}
            meta["partialnet.precision"] = precision
            meta["partialnet.quantization"] = json.dumps({"scheme": scheme.name, "method": session.method,
                                                          "calibration": session.calib.source, "policy": policy.name},
                                                         sort_keys=True)
            write_metadata(tmp, meta)
            onnx.checker.check_model(str(tmp))
            if check is not None:
                info["structure"] = check(tmp)
        return {
            **info,
            "calibration": session.calibration_info(),
            "pre_processing": session.pre_processing,
            "policy": policy.to_dict(),
            "excluded_node_names": exclude,
        }
    finally:
        if own:
            session.close()
