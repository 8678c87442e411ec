"""NNCF post-training INT8 of the OpenVINO IR, with the shared exclusion policy as an nncf.IgnoredScope.

Plain mode is `nncf.quantize` over the calibration images (subset_size = all of them, fast bias correction).
Accuracy-controlled mode is `nncf.quantize_with_accuracy_control` on a labelled validation ImageSet with a maximum
absolute top-1 drop; NNCF then reverts the most harmful quantizers to float until the drop is met.

Settings (why each, with the measurements: benchmarks/DECISIONS.md):

* model_type None (CNN) with the MIXED preset (asymmetric activations) and activation ranges from the global
  min/max over the calibration set (`RangeEstimatorParametersSet.MINMAX`), not NNCF's mean of per-image ranges,
  which clips every image whose range exceeds the average one. TRANSFORMER is faster but wrong on PartialNet's
  strided convolutions; `model_type="transformer"` stays available for experiments.
* Which CPUs the weights are exact on (`int8_cpu`, runtimes.cpu): "vnni" keeps full 8-bit weights in every layer
  but the first (NNCF's OverflowFix.FIRST_LAYER), exact only on CPUs with VNNI or AMX; "any" quantizes weights to
  7 bits (OverflowFix.ENABLE), so no u8 x s8 pair sum can saturate 16 bits on any x86 CPU. "auto" picks by this
  machine.

The IgnoredScope is made of op names resolved from the ONNX graph (calibration.policy), all present in the model
(NNCF validates that); after quantization the ignored ops are checked for FakeQuantize on their inputs, and the
result reports how many ignored ops still read a quantized tensor (one shared with a quantized consumer).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import numpy as np
import onnx

from partialnet.console import SILENT, Console
from partialnet.errors import UsageError, first_line
from runtimes.cpu import int8_dot_saturates
from runtimes.ov import INT8_CPU_KEY, METADATA_RT_KEY, check_ir_destination, save_ir

from .ort_int8 import QuantizationError, check_calibration_set, model_input_size
from .policy import DEFAULT_POLICY, FloatPolicy, OnnxGraph
from .sources import ImageSet

ModelType = Literal["transformer", "cnn"]
Int8Cpu = Literal["auto", "any", "vnni"]
INT8_CPUS: tuple[str, ...] = ("auto", "any", "vnni")

# Kept in float on OpenVINO for speed, on top of the shared policy. NNCF's CNN scheme quantizes the PAT_sp gating
# Mul and both inputs of the Concat after it so that the Concat runs in int8: four FakeQuantize ops and an f32
# Split per block, for a tail whose only arithmetic is one multiply (8% faster in float, same error:
# benchmarks/DECISIONS.md).
OV_SPEED_PARTS: dict[str, str] = {
    "sp_tail": "OpenVINO speed: T0 INT8 8% faster with the PAT_sp tail in float, same error (calibration.ov_int8)",
}

# The head's Linear keeps float activations (the policy's "head" part) but gets int8 weights, per output channel,
# symmetric (NNCF weight compression): at batch 1 it is a matrix-vector product bound by reading its weights
# (T0's 1280x1000 Linear is 5 MB in fp32), and the CPU plugin decompresses int8 weights inside its f32 kernel, so
# no u8 x s8 sum exists to saturate on any CPU. The head's 1x1 conv gained nothing that way and stays fp32.
# Measured on T0 224 px INT8 (benchmarks/DECISIONS.md).
HEAD_WEIGHTS = ("int8", "float")
WEIGHTED_OV_OPS = ("MatMul", "Convolution")  # what NNCF's weight compression would touch

WEIGHTS_FOR = {
    "any": "7-bit int8 weights (NNCF overflow fix in every layer): exact on every x86 CPU",
    "vnni": "8-bit int8 weights (NNCF overflow fix in the first layer only): exact only on CPUs with VNNI or AMX",
}


def resolve_int8_cpu(int8_cpu: str) -> str:
    """"any" or "vnni": what "auto" means on this machine (exact weights for the CPU the export runs on)."""
    if int8_cpu not in INT8_CPUS:
        raise UsageError(f"int8_cpu {int8_cpu!r} is not one of {', '.join(INT8_CPUS)}.")
    if int8_cpu == "auto":
        return "any" if int8_dot_saturates() else "vnni"
    return int8_cpu


@contextlib.contextmanager
def _nncf_output_to_stderr(progress: bool = True) -> Iterator[None]:
    """NNCF prints progress bars and INFO lines on stdout; results own stdout, so send them to stderr (or, without
    `progress`, nowhere)."""
    import nncf

    logger = logging.getLogger("nncf")
    level = logger.level
    nncf.set_log_level(logging.WARNING)
    try:
        with contextlib.ExitStack() as stack:
            sink = sys.stderr if progress else stack.enter_context(open(os.devnull, "w", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stdout(sink))
            yield
    finally:
        logger.setLevel(level)


def _read(source: Path) -> Any:
    import openvino as ov

    if source.suffix == ".xml":
        return ov.Core().read_model(str(source))
    return ov.convert_model(str(source))


def top1_validation_fn(compiled_model: Any, items: Iterable[tuple[np.ndarray, int]]) -> tuple[float, list[float]]:
    """NNCF validation function: top-1 accuracy over (image CHW, label) items, and each item's 0/1 correctness."""
    output = compiled_model.outputs[0]
    hits = []
    for image, label in items:
        logits = compiled_model([image[None]])[output]
        hits.append(float(int(np.argmax(logits[0])) == int(label)))
    return (float(np.mean(hits)) if hits else 0.0), hits


def ignored_ops_fed_by_fake_quantize(model: Any, names: Iterable[str]) -> list[str]:
    """Which of the named ops still have a FakeQuantize on a non-constant input in the quantized model."""
    wanted = set(names)
    out = []
    for op in model.get_ordered_ops():
        if op.get_friendly_name() not in wanted:
            continue
        for port in op.inputs():
            src = port.get_source_output().get_node()
            if src.get_type_name() == "FakeQuantize" and src.input_value(0).get_node().get_type_name() != "Constant":
                out.append(op.get_friendly_name())
                break
    return out


@dataclass(frozen=True)
class OvQuantization:
    """How NNCF quantizes: the float policy, the accuracy-controlled mode's images and drop, and the weight range.

    With `val` (labelled) and `max_drop` (a fraction, 0.01 = one point of top-1) the accuracy-controlled mode runs.
    """

    policy: FloatPolicy = DEFAULT_POLICY
    val: ImageSet | None = None
    max_drop: float | None = None
    model_type: ModelType = "cnn"
    fast_bias_correction: bool = True
    int8_cpu: Int8Cpu = "auto"
    head_weights: Literal["int8", "float"] = "int8"

    @property
    def accuracy_control(self) -> bool:
        return self.max_drop is not None

    def check(self) -> str:
        """Raise UsageError for settings that cannot work; return the resolved int8_cpu ("any" or "vnni")."""
        if self.model_type not in ("transformer", "cnn"):
            raise UsageError(f"model_type {self.model_type!r} is not 'transformer' or 'cnn'.")
        if self.head_weights not in HEAD_WEIGHTS:
            raise UsageError(f"head_weights {self.head_weights!r} is not one of {', '.join(HEAD_WEIGHTS)}.")
        if self.accuracy_control:
            if self.val is None or self.val.labels is None:
                raise UsageError("accuracy-controlled INT8 needs labelled validation images (class subfolders or a "
                                 "labelled list).")
            if not 0 <= self.max_drop < 1:  # type: ignore[operator]
                raise UsageError(f"max_drop is a fraction of top-1 (0.01 = one point); got {self.max_drop}.")
        return resolve_int8_cpu(self.int8_cpu)

    def nncf_kwargs(self, ignored: list[str], weights_for: str, subset_size: int) -> dict[str, Any]:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        kwargs: dict[str, Any] = {
            "subset_size": subset_size,
            "fast_bias_correction": self.fast_bias_correction,
            "ignored_scope": nncf.IgnoredScope(names=ignored, validate=True),
            "model_type": nncf.ModelType.TRANSFORMER if self.model_type == "transformer" else None,
        }
        advanced: dict[str, Any] = {
            "overflow_fix": OverflowFix.ENABLE if weights_for == "any" else OverflowFix.FIRST_LAYER}
        if self.model_type == "cnn":
            kwargs["preset"] = nncf.QuantizationPreset.MIXED
            advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
        # quantize_with_accuracy_control takes the same settings under another keyword
        key = "advanced_quantization_parameters" if self.accuracy_control else "advanced_parameters"
        kwargs[key] = AdvancedQuantizationParameters(**advanced)
        return kwargs


def quantize_ov(source: str | Path, onnx_path: str | Path, dest: str | Path, calib: ImageSet,
                settings: OvQuantization = OvQuantization(), *, metadata: Mapping[str, str] | None = None,
                force: bool = False, console: Console = SILENT) -> dict[str, Any]:
    """INT8 of the OpenVINO model `source` (IR .xml, or an .onnx to convert) into `dest` (.xml + .bin).

    `onnx_path` is the float ONNX the IR was converted from: the policy is resolved on it and mapped to op names.
    """
    import nncf
    import openvino as ov

    source, onnx_path, dest = Path(source), Path(onnx_path), Path(dest)
    if dest.suffix != ".xml":
        raise UsageError(f"OpenVINO INT8 destination {dest} must end in .xml (the weights go beside it in .bin).")
    check_ir_destination(dest, force)
    for p, what in ((source, "OpenVINO model"), (onnx_path, "ONNX model")):
        if not p.is_file():
            raise UsageError(f"{what} {p} does not exist; run 'deploy export' first.")
    weights_for = settings.check()
    onnx_model = onnx.load(str(onnx_path), load_external_data=False)
    check_calibration_set(calib, model_input_size(onnx_model))
    if settings.val is not None:
        check_calibration_set(settings.val, model_input_size(onnx_model))

    model = _read(source)
    policy = settings.policy.with_parts(OV_SPEED_PARTS, reasons=OV_SPEED_PARTS)
    graph = OnnxGraph(onnx_model)
    ignored = policy.ov_ignored_names(model, graph)
    # Not under accuracy control: NNCF's drop guarantee covers only what it measured.
    head = (head_matmuls(model, graph) if settings.head_weights == "int8" and "head" in policy.parts
            and not settings.accuracy_control else [])
    kwargs = settings.nncf_kwargs(ignored, weights_for, len(calib))
    val = settings.val
    console(f"quantizing the OpenVINO model with NNCF on {len(calib)} images"
            + (f" (accuracy control: max top-1 drop {settings.max_drop:.3f} on {len(val)} labelled images)"
               if settings.accuracy_control and val is not None else ""))
    quantized = _run_nncf(model, calib, settings, kwargs, console)
    if head:
        quantized = compress_weights_of(quantized, head, console)

    meta = dict(metadata or {})
    meta["partialnet.precision"] = "int8"
    meta[INT8_CPU_KEY] = weights_for
    for key, value in meta.items():
        quantized.set_rt_info(value, [METADATA_RT_KEY, key])
    ops = Counter(o.get_type_name() for o in quantized.get_ordered_ops())
    if ops.get("FakeQuantize", 0) == 0:
        raise QuantizationError("NNCF produced no FakeQuantize op: nothing was quantized; check the ignored scope.")
    still_quantized = ignored_ops_fed_by_fake_quantize(quantized, ignored)
    save_ir(quantized, dest, force=force)
    return {
        "tool": f"nncf {nncf.__version__}, openvino {ov.__version__}",
        "mode": "quantize_with_accuracy_control" if settings.accuracy_control else "quantize",
        "max_drop": settings.max_drop,
        "model_type": settings.model_type,
        "preset": "mixed",
        "activation_ranges": "global min/max" if settings.model_type == "cnn" else "nncf default",
        "fast_bias_correction": settings.fast_bias_correction,
        "int8_cpu": weights_for,
        "weights": WEIGHTS_FOR[weights_for],
        "head_weights": ({"ops": head, "weights": "int8 per output channel, symmetric (weight-only: float "
                          "activations and arithmetic)"} if head else "float"),
        "subset_size": len(calib),
        "fake_quantize": ops.get("FakeQuantize", 0),
        "ignored_ops": len(ignored),
        "ignored_ops_reading_quantized_input": still_quantized,
        "calibration": {"source": calib.source, "size": len(calib), "skipped_images": len(calib.skipped),
                        "user_data": calib.user_data},
        "validation": ({"source": val.source, "size": len(val)} if settings.accuracy_control and val is not None
                       else None),
        "policy": policy.to_dict(),
        "ignored_names": ignored,
    }


def head_matmuls(model: Any, graph: OnnxGraph) -> list[str]:
    """The OpenVINO op names of the head's matrix products (in the policy's "head" part): its Linear."""
    names = set(FloatPolicy(parts=("head",)).ov_ignored_names(model, graph))
    return [o.get_friendly_name() for o in model.get_ordered_ops()
            if o.get_type_name() == "MatMul" and o.get_friendly_name() in names]


def compress_weights_of(model: Any, names: list[str], console: Console = SILENT) -> Any:
    """`model` with the float weights of the named ops, and of no other op, stored as int8 (NNCF weight compression,
    per output channel, symmetric); activations and arithmetic stay float."""
    import nncf

    keep = set(names)
    others = [o.get_friendly_name() for o in model.get_ordered_ops()
              if o.get_type_name() in WEIGHTED_OV_OPS and o.get_friendly_name() not in keep]
    try:
        with _nncf_output_to_stderr(console.shows_progress):
            return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM,
                                         ignored_scope=nncf.IgnoredScope(names=others, validate=False))
    except Exception as e:  # NNCF and OpenVINO raise many types; the message carries the reason
        raise QuantizationError(f"NNCF weight compression of the head failed: {first_line(e)}") from e


def _run_nncf(model: Any, calib: ImageSet, settings: OvQuantization, kwargs: dict[str, Any], console: Console) -> Any:
    import nncf

    calib_ds = nncf.Dataset(list(calib.images), lambda x: x[None])
    try:
        with _nncf_output_to_stderr(console.shows_progress):
            if settings.accuracy_control and settings.val is not None and settings.val.labels is not None:
                val_ds = nncf.Dataset(list(zip(settings.val.images, settings.val.labels.tolist())),
                                      lambda item: item[0][None])
                return nncf.quantize_with_accuracy_control(
                    model, calib_ds, val_ds, top1_validation_fn, max_drop=settings.max_drop,
                    drop_type=nncf.DropType.ABSOLUTE, **kwargs)
            return nncf.quantize(model, calib_ds, **kwargs)
    except nncf.ValidationError as e:
        raise QuantizationError(f"NNCF rejected the ignored scope ({e}); the policy names ops the model lacks.") from e
    except Exception as e:  # NNCF and OpenVINO raise many types; the message carries the reason
        raise QuantizationError(f"NNCF quantization failed: {first_line(e)}") from e
