"""OpenVINO INT8 with NNCF (calibration/ov_int8.py): the scope, the weights' range per CPU kind, refusals.

The model is PartialNet-T0 with randomized BatchNorm statistics, affines and iRPE tables, 10 classes, exported at
64 px (tests/calibration/conftest.py).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from calibration.policy import DEFAULT_POLICY
from partialnet.errors import UsageError
from runtimes.base import BackendUnavailable
from runtimes.cpu import int8_dot_saturates
from int8_fixtures import BLOCK, MIN_AGREEMENT, MIN_COSINE, agreement



# --------------------------------------------------------------------------------------------------------
# OpenVINO (NNCF)
# --------------------------------------------------------------------------------------------------------


def test_nncf_ir_is_quantized_and_respects_the_scope(ov_int8, calib, ref):
    import openvino as ov

    path, info = ov_int8
    assert path.is_file() and path.with_suffix(".bin").is_file()
    q = ov.Core().read_model(str(path))
    types = Counter(o.get_type_name() for o in q.get_ordered_ops())
    assert types["FakeQuantize"] == info["fake_quantize"] > 0
    by_name = {o.get_friendly_name(): o for o in q.get_ordered_ops()}
    fq_fed = {name for name, o in by_name.items()
              if any(p.get_source_output().get_node().get_type_name() == "FakeQuantize" for p in o.inputs())}
    convs = [n for n, o in by_name.items() if o.get_type_name() == "Convolution"]
    block = [n for n in convs if n.startswith("/stages/stages.4/blocks/blocks.3/")]
    assert len(block) == 4 and not set(block) & fq_fed  # the float block: no FakeQuantize on its convs
    srm = [n for n in convs if "/attn/cfc1/" in n]
    assert len(srm) == 11 and not set(srm) & fq_fed  # the default policy's SRM gates stay float
    # the head's Linear stays float too (OpenVINO names its last op after the output tensor, "logits")
    head = sorted(head_linear(q))
    assert len(head) == 1 and head[0] not in fq_fed and info["head_weights"]["ops"] == head
    # ... with weight-only int8: an i8 constant decompressed to f32 on the way into the Linear (ov_int8.HEAD_WEIGHTS)
    weight = by_name[head[0]].input_value(1).get_node()
    chain = [weight.get_type_name()]
    while weight.get_type_name() != "Constant":
        weight = weight.input_value(0).get_node()
        chain.append(weight.get_type_name())
    assert "Multiply" in chain and weight.get_element_type().get_type_name() == "i8"
    assert weight.get_output_shape(0)[0] in (10, 1280)  # the whole 1280 x 10 matrix, not a per-tensor scalar
    # every other conv reads a quantized tensor, directly or through the Split/Concat NNCF moves FakeQuantize above
    def quantized_source(node) -> bool:
        kind = node.get_type_name()
        if kind in ("VariadicSplit", "Split", "Reshape"):
            return quantized_source(node.input_value(0).get_node())
        if kind == "Concat":
            return all(quantized_source(node.input_value(i).get_node()) for i in range(node.get_input_size()))
        return kind == "FakeQuantize"

    head_conv = [n for n in convs if n.startswith("/avgpool_pre_head/")]
    quantized = [n for n in convs if n not in set(block) | set(srm) | set(head_conv)]
    assert len(quantized) == 40 and all(quantized_source(by_name[n].input_value(0).get_node()) for n in quantized)
    assert info["ignored_ops_reading_quantized_input"] == []
    # OpenVINO's speed part: the PAT_sp tail (Split, gating Mul, Concat) reads the fp32 conv output, no FakeQuantize
    tails = [n for n, o in by_name.items() if o.get_type_name() == "Concat" and n.endswith("/mlp/Concat")]
    assert len(tails) == 13 and not set(tails) & fq_fed and "sp_tail" in info["policy"]["float_parts"]
    assert q.get_rt_info(["partialnet", "partialnet.precision"]).astype(str) == "int8"
    compiled = ov.Core().compile_model(q, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    top1, cos = agreement(ref, compiled(calib.images)[compiled.outputs[0]])
    assert top1 >= MIN_AGREEMENT and cos >= MIN_COSINE


def head_linear(model) -> set[str]:
    """The name of the MatMul that computes the logits (OpenVINO names the op, or the Add after it, "logits")."""
    return {o.get_friendly_name() for o in model.get_ordered_ops() if o.get_type_name() == "MatMul"
            and "logits" in {c.get_node().get_friendly_name() for c in o.output(0).get_target_inputs()}
            | {o.get_friendly_name()}}


def _weight_reader(const):
    """The op an int8 weight constant is decompressed into (through Convert, Subtract, Multiply, Reshape)."""
    node = const
    while node.get_type_name() in ("Constant", "Convert", "Subtract", "Multiply", "Reshape", "Transpose"):
        node = next(iter(node.output(0).get_target_inputs())).get_node()
    return node


def int8_weight_range(model) -> tuple[int, int]:
    """Smallest and largest stored int8 weight of an NNCF-quantized IR's int8 arithmetic: the head's weight-only
    int8 Linear (decompressed to f32 before any product, ov_int8.HEAD_WEIGHTS) has no u8 x s8 sum to saturate."""
    head = head_linear(model)
    values = [o.get_data() for o in model.get_ordered_ops()
              if o.get_type_name() == "Constant" and o.get_element_type().get_type_name() == "i8"
              and _weight_reader(o).get_friendly_name() not in head]
    assert values, "no int8 weight constants"
    return min(int(v.min()) for v in values), max(int(v.max()) for v in values)


def test_openvino_int8_weights_are_exact_on_the_cpus_they_are_stamped_for(ov_int8, folder, calib, tmp_path):
    """'auto' picks this machine's kind; 'any' keeps every u8 x s8 pair sum within int16 (weights within
    [-64, 64]: 2 x 255 x 64 = 32640); a full-range ('vnni') IR is refused by the runner on a CPU that would saturate."""
    import openvino as ov

    from calibration.ov_int8 import OvQuantization, quantize_ov
    from runtimes.ov import OpenVINORunner

    path, info = ov_int8
    expected = "any" if int8_dot_saturates() else "vnni"
    assert info["int8_cpu"] == expected
    assert ov.Core().read_model(str(path)).get_rt_info(["partialnet", "partialnet.int8_cpu"]).astype(str) == expected
    other = "vnni" if expected == "any" else "any"
    dest = tmp_path / "other.int8.xml"
    quantize_ov(folder / "openvino" / "model.xml", folder / "model.onnx", dest, calib, OvQuantization(int8_cpu=other))
    by_cpu = {expected: int8_weight_range(ov.Core().read_model(str(path))),
              other: int8_weight_range(ov.Core().read_model(str(dest)))}
    assert -64 <= by_cpu["any"][0] and by_cpu["any"][1] <= 64
    assert max(-by_cpu["vnni"][0], by_cpu["vnni"][1]) >= 127
    vnni_ir = path if expected == "vnni" else dest
    if int8_dot_saturates():
        with pytest.raises(BackendUnavailable, match=r"exact only on CPUs with VNNI or AMX.*--int8-cpu any"):
            OpenVINORunner(vnni_ir, precision="int8")
    else:
        assert OpenVINORunner(vnni_ir, precision="int8").options["int8_cpu"] == "vnni"
    with pytest.raises(UsageError, match=r"int8_cpu 'arm' is not one of auto, any, vnni"):
        quantize_ov(folder / "openvino" / "model.xml", folder / "model.onnx", tmp_path / "x.xml", calib,
                    OvQuantization(int8_cpu="arm"))  # type: ignore[arg-type]


def test_nncf_refuses_to_overwrite(ov_int8, folder, calib):
    from calibration.ov_int8 import OvQuantization, quantize_ov

    with pytest.raises(UsageError, match=r"model.int8.xml exists; pass --force to overwrite it\."):
        quantize_ov(folder / "openvino" / "model.xml", folder / "model.onnx", ov_int8[0], calib)
    with pytest.raises(UsageError, match="accuracy-controlled INT8 needs labelled validation images"):
        quantize_ov(folder / "openvino" / "model.xml", folder / "model.onnx", ov_int8[0].with_name("x.xml"), calib,
                    OvQuantization(val=calib, max_drop=0.01))


def test_head_weights_float_keeps_the_linear_in_fp32_and_int8_moves_the_logits_little(ov_int8, folder, calib,
                                                                                      tmp_path):
    import openvino as ov

    from calibration.ov_int8 import OvQuantization, quantize_ov

    dest = tmp_path / "float-head.xml"
    info = quantize_ov(folder / "openvino" / "model.xml", folder / "model.onnx", dest, calib,
                       OvQuantization(policy=DEFAULT_POLICY.with_units([BLOCK]), head_weights="float"))
    assert info["head_weights"] == "float"
    model = ov.Core().read_model(str(dest))
    linear = next(o for o in model.get_ordered_ops() if o.get_friendly_name() == ov_int8[1]["head_weights"]["ops"][0])
    assert linear.input_value(1).get_node().get_type_name() == "Constant"  # fp32 weights, no decompression
    assert linear.input_value(1).get_node().get_element_type().get_type_name() == "f32"
    core = ov.Core()
    outs = [core.compile_model(str(p), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}) for p in (dest, ov_int8[0])]
    fp32_head, int8_head = (np.asarray(c(calib.images)[c.outputs[0]]) for c in outs)
    assert 0 < np.abs(int8_head - fp32_head).max() <= 0.02 * np.abs(fp32_head).max()  # per-channel 8-bit weights
    with pytest.raises(UsageError, match="head_weights 'int4' is not one of int8, float"):
        quantize_ov(folder / "openvino" / "model.xml", folder / "model.onnx", tmp_path / "x.xml", calib,
                    OvQuantization(head_weights="int4"))  # type: ignore[arg-type]
