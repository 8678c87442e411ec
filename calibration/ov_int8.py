"""NNCF post-training INT8 of the OpenVINO IR, with the shared exclusion policy as an nncf.IgnoredScope.

Plain mode is `nncf.quantize` over the calibration images (subset_size = all of them, fast bias correction).
Accuracy-controlled mode is `nncf.quantize_with_accuracy_control` on a labelled validation ImageSet with a maximum
absolute top-1 drop; NNCF then reverts the most harmful quantizers to float until the drop is met.

Settings (measured on T0 at 224 px, 128 calibration crops, 256 held-out crops, top-1 agreement with FP32):

* model_type None (CNN) with the MIXED preset (asymmetric activations) and activation ranges from the global
  min/max over the calibration set (`RangeEstimatorParametersSet.MINMAX`). NNCF's CNN default is symmetric
  activations with the *mean* of the per-image min/max, which clips the activations of every image whose range exceeds the average one: on a
  freshly built T0 that was agreement 0.93, max |dlogit| 2.8; with these settings 0.97 and 0.26, same latency.
* TRANSFORMER is faster (0.9x of the CNN latency) but wrong on PartialNet: quantizing the strided convolutions
  (patch embedding, patch merging) in that mode drops agreement to 0.6 (cosine 0.85), with or without SmoothQuant,
  although their input ranges and weights match the CNN mode's; with them in float it is no faster than CNN.
  `model_type="transformer"` stays available for experiments.

* Which CPUs the weights are exact on (`int8_cpu`, runtimes.cpu): "vnni" keeps full 8-bit weights in every layer
  but the first (NNCF's OverflowFix.FIRST_LAYER), exact only on CPUs with VNNI or AMX; "any" quantizes weights to
  7 bits (OverflowFix.ENABLE), so no u8 x s8 pair sum can saturate 16 bits on any x86 CPU. "auto" picks by this
  machine. Measured on T0 at 224 px, Zen 2 without VNNI: FIRST_LAYER agreement 0.78 / cosine 0.981 against FP32,
  ENABLE 0.97 / 0.99934. 7-bit weights cost accuracy where 8 bits are exact: the same weight rounding in ONNX
  Runtime's exact simulation gave 1 - cosine 4.8e-4 against 2.0e-4 (T0, 64 default images).

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
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import numpy as np
import onnx

from partialnet.errors import UsageError

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
# Split per block, for a tail whose only arithmetic is one multiply. In float the tail reads the fp32 conv output
# directly. T0 at 224 px, batch 1, 2 threads, three interleaved runs: 3.68 -> 3.38 ms median (8% faster), cosine
# and max |dlogit| against FP32 unchanged (1 - 2.9e-4, 0.29 on 256 held-out images).
OV_SPEED_PARTS: dict[str, str] = {
    "sp_tail": "OpenVINO speed: T0 INT8 8% faster with the PAT_sp tail in float, same error (calibration.ov_int8)",
}

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


def quantize_ov(
    source: str | Path,
    onnx_path: str | Path,
    dest: str | Path,
    calib: ImageSet,
    *,
    policy: FloatPolicy = DEFAULT_POLICY,
    val: ImageSet | None = None,
    max_drop: float | None = None,
    model_type: ModelType = "cnn",
    fast_bias_correction: bool = True,
    int8_cpu: Int8Cpu = "auto",
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    progress: bool = True,
) -> dict[str, Any]:
    """INT8 of the OpenVINO model `source` (IR .xml, or an .onnx to convert) into `dest` (.xml + .bin).

    `onnx_path` is the float ONNX the IR was converted from: the policy is resolved on it and mapped to op names.
    With `val` (labelled) and `max_drop` (a fraction, 0.01 = one point of top-1) the accuracy-controlled mode runs.
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
    if model_type not in ("transformer", "cnn"):
        raise UsageError(f"model_type {model_type!r} is not 'transformer' or 'cnn'.")
    weights_for = resolve_int8_cpu(int8_cpu)
    accuracy_control = max_drop is not None
    if accuracy_control:
        if val is None or val.labels is None:
            raise UsageError("accuracy-controlled INT8 needs labelled validation images (class subfolders or a labelled list).")
        if not 0 <= max_drop < 1:
            raise UsageError(f"max_drop is a fraction of top-1 (0.01 = one point); got {max_drop}.")
    graph = OnnxGraph(onnx.load(str(onnx_path), load_external_data=False))
    size = model_input_size(onnx.load(str(onnx_path), load_external_data=False))
    check_calibration_set(calib, size)
    if val is not None:
        check_calibration_set(val, size)

    model = _read(source)
    policy = policy.with_parts(OV_SPEED_PARTS, reasons=OV_SPEED_PARTS)
    ignored = policy.ov_ignored_names(model, graph)
    scope = nncf.IgnoredScope(names=ignored, validate=True)
    kwargs: dict[str, Any] = {
        "subset_size": len(calib),
        "fast_bias_correction": fast_bias_correction,
        "ignored_scope": scope,
        "model_type": nncf.ModelType.TRANSFORMER if model_type == "transformer" else None,
    }
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced: dict[str, Any] = {
        "overflow_fix": OverflowFix.ENABLE if weights_for == "any" else OverflowFix.FIRST_LAYER}
    if model_type == "cnn":
        kwargs["preset"] = nncf.QuantizationPreset.MIXED
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
    kwargs["advanced_parameters"] = AdvancedQuantizationParameters(**advanced)
    calib_ds = nncf.Dataset(list(calib.images), lambda x: x[None])
    log(f"quantizing the OpenVINO model with NNCF on {len(calib)} images"
        + (f" (accuracy control: max top-1 drop {max_drop:.3f} on {len(val)} labelled images)" if accuracy_control else ""))
    try:
        with _nncf_output_to_stderr(progress):
            if accuracy_control:
                val_ds = nncf.Dataset(list(zip(val.images, val.labels.tolist())), lambda item: item[0][None])
                ac_kwargs = dict(kwargs)
                if "advanced_parameters" in ac_kwargs:  # the same settings under this function's keyword
                    ac_kwargs["advanced_quantization_parameters"] = ac_kwargs.pop("advanced_parameters")
                quantized = nncf.quantize_with_accuracy_control(
                    model, calib_ds, val_ds, top1_validation_fn, max_drop=max_drop,
                    drop_type=nncf.DropType.ABSOLUTE, **ac_kwargs,
                )
            else:
                quantized = nncf.quantize(model, calib_ds, **kwargs)
    except nncf.ValidationError as e:
        raise QuantizationError(f"NNCF rejected the ignored scope ({e}); the policy names ops the model lacks.") from e
    except Exception as e:  # NNCF and OpenVINO raise many types; the message carries the reason
        raise QuantizationError(f"NNCF quantization failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

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
        "mode": "quantize_with_accuracy_control" if accuracy_control else "quantize",
        "max_drop": max_drop,
        "model_type": model_type,
        "preset": "mixed",
        "activation_ranges": "global min/max" if model_type == "cnn" else "nncf default",
        "fast_bias_correction": fast_bias_correction,
        "int8_cpu": weights_for,
        "weights": WEIGHTS_FOR[weights_for],
        "subset_size": len(calib),
        "fake_quantize": ops.get("FakeQuantize", 0),
        "ignored_ops": len(ignored),
        "ignored_ops_reading_quantized_input": still_quantized,
        "calibration": {"source": calib.source, "size": len(calib), "skipped_images": len(calib.skipped),
                        "user_data": calib.user_data},
        "validation": ({"source": val.source, "size": len(val)} if accuracy_control and val is not None else None),
        "policy": policy.to_dict(),
        "ignored_names": ignored,
    }
