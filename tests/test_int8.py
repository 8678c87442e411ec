"""INT8 (calibration/, deploy/int8.py): Q/DQ structure, agreement with FP32, keyed caches, the shared policy,
NNCF output, the sensitivity pass, and (slow) one point of top-1 on real digits.

The model is PartialNet-T0 with randomized BatchNorm statistics, affines and iRPE tables (so the attention-bias
Add survives simplification and a wrong fold would show), 10 classes, reparameterized and exported at 64 px,
calibrated on 32 embedded images. Agreement thresholds are checked on the calibration images themselves, where
the quantization grid was fitted; measured there: top-1 agreement 1.0 for all three artifacts, cosine 0.9994
(onnxruntime), 0.9996 (Q/DQ), 0.9987 (OpenVINO).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from calibration.cache import CacheKey, KeyedCache
from calibration.ort_int8 import QuantizationError, QuantSession, quantize_ort
from calibration.policy import DEFAULT_POLICY, NO_EXCLUSIONS, PARTS, FloatPolicy, OnnxGraph, OvIndex, unit_of_name
from calibration.qdq import build_qdq, check_qdq
from calibration.rewrites import fuse_gelu, rescale_gate_rows, split_gate_rows
from calibration.sensitivity import Target, sensitivity_pass
from calibration.sources import default_images
from helpers import randomize_
from partialnet import build_model
from partialnet.errors import UsageError
from partialnet.variants import Preprocess
from runtimes.base import BackendUnavailable
from runtimes.cpu import int8_dot_saturates
from runtimes.compare import Drift
from runtimes.ort import OrtRunner

SIZE = 64
CLASSES = 10
CALIB = 32
MIN_AGREEMENT = 0.9  # top-1 agreement with FP32 on the calibration images (measured 1.0)
MIN_COSINE = 0.995  # mean logit cosine with FP32 on the calibration images (measured >= 0.9987)
T0_UNITS = (["patch_embed", "stages.0.blocks.0", "stages.1", "stages.2.blocks.0", "stages.2.blocks.1", "stages.3"]
            + [f"stages.4.blocks.{j}" for j in range(8)] + ["stages.5", "stages.6.blocks.0", "stages.6.blocks.1", "head"])
BLOCK = "stages.4.blocks.3"


# --------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return randomize_(build_model("partialnet_t0", num_classes=CLASSES, log=lambda msg: None).model.eval(), seed=1)


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory) -> Path:
    """model.onnx (reparameterized, 64 px) and openvino/model.xml, as `deploy export` lays them out."""
    from export.reparam import reparameterize_model
    from export.to_onnx import export_onnx
    from runtimes.ov import convert_to_ir

    out = tmp_path_factory.mktemp("export")
    export_onnx(reparameterize_model(model, SIZE), out / "model.onnx", SIZE)
    convert_to_ir(out / "model.onnx", out / "openvino" / "model.xml")
    return out


@pytest.fixture(scope="module")
def pp() -> Preprocess:
    return Preprocess(input_size=SIZE)


@pytest.fixture(scope="module")
def calib(pp):
    return default_images(CALIB, pp, seed=0)


@pytest.fixture(scope="module")
def ref(model, calib) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(calib.images)).numpy()


@pytest.fixture(scope="module")
def graph(folder) -> OnnxGraph:
    return OnnxGraph(onnx.load(str(folder / "model.onnx")))


@pytest.fixture(scope="module")
def session(folder, calib, pp, tmp_path_factory):
    with QuantSession(folder / "model.onnx", calib, "minmax", pp.to_dict(),
                      cache_dir=tmp_path_factory.mktemp("ranges")) as s:
        yield s


@pytest.fixture(scope="module")
def ort_int8(folder, calib, session, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ort") / "model.int8.onnx"
    return dest, quantize_ort(folder / "model.onnx", dest, calib, session=session, metadata={"partialnet.variant": "t0"})


@pytest.fixture(scope="module")
def qdq(folder, calib, session, tmp_path_factory):
    dest = tmp_path_factory.mktemp("trt") / "model.qdq.onnx"
    return dest, build_qdq(folder / "model.onnx", dest, calib, session=session)


@pytest.fixture(scope="module")
def ov_int8(folder, calib, tmp_path_factory):
    from calibration.ov_int8 import OvQuantization, quantize_ov

    dest = tmp_path_factory.mktemp("ov") / "model.int8.xml"
    info = quantize_ov(folder / "openvino" / "model.xml", folder / "model.onnx", dest, calib,
                       OvQuantization(policy=DEFAULT_POLICY.with_units([BLOCK])), metadata={"partialnet.variant": "t0"})
    return dest, info


def ort_logits(path: Path, x: np.ndarray, **options) -> np.ndarray:
    """INT8 logits the way users get them: through the runner, which picks exact kernels on a CPU without VNNI."""
    runner = OrtRunner(path, precision="int8", **options)
    return runner.run({"input": x})["logits"]


def agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    d = Drift.between(ref, got)
    return d.top1_agreement, d.cosine_similarity


def dq_fed_inputs(proto: onnx.ModelProto) -> dict[str, int]:
    """For each node name, how many of its inputs come out of a DequantizeLinear."""
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: sum(i in dq_out for i in n.input) for n in proto.graph.node}


# --------------------------------------------------------------------------------------------------------
# policy: parts and units resolved on the graph, same units on both backends
# --------------------------------------------------------------------------------------------------------


def test_units_follow_the_exporter_scopes(graph):
    assert graph.unit_names() == T0_UNITS
    assert all(graph.units[n.name] is not None for n in graph.nodes)  # unscoped nodes took their neighbours' unit
    assert unit_of_name("/stages/stages.4/blocks/blocks.3/mlp/fc1/Conv") == BLOCK
    assert unit_of_name("/stages/stages.5/Conv") == "stages.5"
    assert unit_of_name("/Flatten") is None and graph.units["/Flatten"] == "head"


def test_parts_match_the_deploy_graph(graph, folder):
    graph_path = folder / "model.onnx"
    ops = {p: Counter(graph.by_name[n].op_type for n in graph.part_nodes(p)) for p in PARTS}
    assert ops["softmax"] == {"Softmax": 2, "MatMul": 2}  # the two PAT_sf blocks
    assert ops["attn_bias"] == {"Add": 2, "MatMul": 2}  # baked bias Add and q@k^T
    assert ops["layernorm"] == {"LayerNormalization": 2, "MatMul": 2}
    assert ops["srm_stats"]["Conv"] == 11 and ops["srm_stats"]["ReduceMean"] == 22  # 11 PAT_ch blocks
    assert ops["srm_stats"]["Clip"] == 11 and "Split" not in ops["srm_stats"]
    assert ops["sp_gate"] == {"Clip": 13, "Mul": 13, "Add": 13}  # PAT_sp in all 13 blocks
    assert ops["sp_tail"] == {"Split": 13, "Clip": 13, "Mul": 13, "Add": 13, "Concat": 13}
    tail_splits = [graph.by_name[n] for n in graph.part_nodes("sp_tail") if graph.by_name[n].op_type == "Split"]
    assert all("/mlp/" in n.name and graph.producers_of(n)[0].op_type == "Conv" for n in tail_splits)
    split = onnx.load(str(graph_path))
    split_gate_rows(split)
    gate = Counter(OnnxGraph(split).by_name[n].op_type for n in OnnxGraph(split).part_nodes("sp_gate"))
    assert gate == {"Conv": 13, "Clip": 13, "Mul": 13, "Add": 13}  # the split-off gate conv joins the part
    rescaled = onnx.load(str(graph_path))
    rescale_gate_rows(rescaled, {n.output[0]: (-1.0, 2.0) for n in rescaled.graph.node if n.op_type == "Conv"})
    gate = Counter(OnnxGraph(rescaled).by_name[n].op_type for n in OnnxGraph(rescaled).part_nodes("sp_gate"))
    assert gate == {"HardSigmoid": 13, "Mul": 13, "Add": 13}
    assert {"GlobalAveragePool", "Conv", "Gemm"} <= set(ops["head"]) and ops["head"]["Conv"] == 1


def test_policy_maps_one_block_to_onnx_and_openvino(folder, graph):
    import openvino as ov

    policy = FloatPolicy(units=(BLOCK,))
    onnx_names = policy.onnx_nodes_to_exclude(graph)
    assert onnx_names and all(n.startswith("/stages/stages.4/blocks/blocks.3/") for n in onnx_names)
    assert onnx_names == [n.name for n in graph.nodes if n.name.startswith("/stages/stages.4/blocks/blocks.3/")]

    ov_model = ov.Core().read_model(str(folder / "openvino" / "model.xml"))
    ov_names = policy.ov_ignored_names(ov_model, graph)
    existing = {o.get_friendly_name() for o in ov_model.get_ordered_ops()}
    assert set(ov_names) <= existing  # names resolved from the ONNX graph exist in the IR
    assert all(n.startswith("/stages/stages.4/blocks/blocks.3/") for n in ov_names)
    # every weighted ONNX node of the block has its OpenVINO op (a Conv with bias is '<name>/WithoutBiases')
    for n in onnx_names:
        if graph.by_name[n].op_type in ("Conv", "MatMul"):
            assert n in ov_names or n + "/WithoutBiases" in ov_names
    scope = policy.ov_ignored_scope(ov_model, graph)
    assert scope.names == ov_names and scope.validate is True


def test_policy_maps_fused_and_renamed_openvino_ops(folder, graph):
    import openvino as ov

    ov_model = ov.Core().read_model(str(folder / "openvino" / "model.xml"))
    index = OvIndex(ov_model, graph)
    # LayerNormalization becomes an MVN with a fresh name; it is placed in its block by its neighbours
    mvn = [o.get_friendly_name() for o in ov_model.get_ordered_ops() if o.get_type_name() == "MVN"]
    assert len(mvn) == 2 and all(index.unnamed_units[n].startswith("stages.6.blocks.") for n in mvn)
    # the attention logits (q@k^T, bias Add) are fused into ScaledDotProductAttention, found as their absorber
    names = FloatPolicy(parts=("attn_bias",)).ov_ignored_names(ov_model, graph)
    types = {o.get_friendly_name(): o.get_type_name() for o in ov_model.get_ordered_ops()}
    assert sorted(types[n] for n in names) == ["ScaledDotProductAttention"] * 2
    # the op feeding the model output is named after the output tensor, not its ONNX node ('/head/Gemm')
    assert index.origin["logits"] == "/head/Gemm"  # (the bias Add here; the MatMul where onnxsim fused them)
    assert "logits" in FloatPolicy(parts=("head",)).ov_ignored_names(ov_model, graph)


def test_policy_rejects_unknown_parts_and_units(graph):
    with pytest.raises(UsageError, match=r"unknown INT8 policy part\(s\) gelu; parts are softmax, layernorm"):
        FloatPolicy(parts=("gelu",))
    with pytest.raises(UsageError, match=r"'blocks.3' is not a unit name; use 'stages.<i>.blocks.<j>'"):
        FloatPolicy(units=("blocks.3",))
    with pytest.raises(UsageError, match=r"keeps stages.4.blocks.9 in float but the graph has no such unit"):
        FloatPolicy(units=("stages.4.blocks.9",)).onnx_nodes_to_exclude(graph)


# --------------------------------------------------------------------------------------------------------
# onnxruntime INT8
# --------------------------------------------------------------------------------------------------------


def test_rewrites_are_exact(folder, calib, session):
    x = calib.images[:4]
    ref = ort_logits(folder / "model.onnx", x)

    def run(proto: onnx.ModelProto) -> np.ndarray:
        onnx.checker.check_model(proto, full_check=True)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0]

    fused = onnx.load(str(folder / "model.onnx"))
    assert fuse_gelu(fused) == 14  # 13 blocks + the head
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Gelu"] == 14 and "Erf" not in ops
    assert np.abs(run(fused) - ref).max() < 1e-4

    split = onnx.load(str(folder / "model.onnx"))
    assert split_gate_rows(split) == 13  # PAT_sp in every block
    inits = {t.name: tuple(t.dims) for t in split.graph.initializer}
    gates = [n for n in split.graph.node if n.name.endswith("/mlp/fc2/Conv_gate")]
    fc2 = [n for n in split.graph.node if n.name.endswith("/mlp/fc2/Conv")]
    assert len(gates) == len(fc2) == 13 and all(inits[n.input[1]][0] == 1 for n in gates)
    assert sorted({inits[n.input[1]][0] for n in fc2}) == [32, 64, 128, 256]  # C rows, no longer C + 1
    assert np.abs(run(split) - ref).max() < 1e-4

    rescaled = onnx.load(str(folder / "model.onnx"))
    ranges = session.range_values()
    assert rescale_gate_rows(rescaled, ranges) == 13
    hsig = [n for n in rescaled.graph.node if n.op_type == "HardSigmoid"]
    assert len(hsig) == 13 and all(n.name.endswith("/mlp/Clip") for n in hsig)
    alphas = {n.name: n.attribute[0].f for n in hsig}
    fc2_max = {n.name: ranges[n.output[0]][1] for n in rescaled.graph.node if n.name.endswith("/mlp/fc2/Conv")}
    assert all(abs(alphas[n.replace("/fc2/Conv", "/Clip")] * m - 1) < 1e-6 for n, m in fc2_max.items())
    assert np.abs(run(rescaled) - ref).max() < 1e-4


def test_ort_int8_structure(ort_int8):
    path, info = ort_int8
    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] == info["quantize_linear"] > 0 and ops["DequantizeLinear"] > 0
    assert ops["Gelu"] == 14 and "Erf" not in ops
    fed = dq_fed_inputs(proto)
    excluded = set(info["excluded_node_names"])
    weighted = [n for n in proto.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    floats = [n.name for n in weighted if fed[n.name] == 0]
    assert sorted(floats) == sorted(n.name for n in weighted if n.name in excluded)
    # the SRM cfc1 convs, the head conv and Linear
    assert len(floats) == 11 + 2 == info["weighted_ops_float"]
    assert info["gelu_fused"] == 14 and info["gate_rows_rescaled"] == 13 and ops["HardSigmoid"] == 13
    assert all(fed[n.name] >= 2 for n in weighted if n.name not in excluded)  # activation and weight through DQ
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["partialnet.precision"] == "int8" and meta["partialnet.variant"] == "t0"
    assert json.loads(meta["partialnet.quantization"])["scheme"] == "onnxruntime-cpu"
    assert info["pre_processing"]["applied"] is True and info["calibration"]["size"] == CALIB


def test_ort_int8_agrees_with_fp32(ort_int8, calib, ref):
    top1, cos = agreement(ref, ort_logits(ort_int8[0], calib.images))
    assert top1 >= MIN_AGREEMENT and cos >= MIN_COSINE


def test_ort_runner_takes_exact_int8_kernels_where_u8s8_saturates(ort_int8, calib, ref):
    """On an x86 CPU without VNNI the runner turns on ONNX Runtime's U8U8 kernels by itself; forced on anywhere,
    they give the same numbers as the simulated quantization (no graph optimization: float Q/DQ arithmetic)."""
    path = ort_int8[0]
    assert OrtRunner(path, precision="int8").options["exact_int8"] == int8_dot_saturates()
    assert OrtRunner(path, precision="fp32").options["exact_int8"] is False  # nothing to saturate in a float graph
    simulated = ort_logits(path, calib.images, graph_optimization="disabled")
    exact = ort_logits(path, calib.images, exact_int8=True)
    scale = np.abs(simulated).max()
    assert np.abs(exact - simulated).max() <= 0.02 * scale  # requantization rounding only, no saturation
    assert agreement(ref, exact)[1] >= MIN_COSINE


@pytest.mark.parametrize("flags, saturates", [
    ({"avx2", "fma"}, True), ({"avx2", "avx512f"}, True), ({"avx2", "avx512_vnni"}, False),
    ({"avx2", "avx_vnni"}, False), ({"avx2", "amx_int8"}, False)])
def test_which_x86_cpus_saturate_int8_dot_products(flags, saturates):
    assert int8_dot_saturates(frozenset(flags)) is saturates


def test_ort_int8_refuses_to_overwrite_and_checks_inputs(ort_int8, folder, calib, pp, session):
    path, _ = ort_int8
    with pytest.raises(UsageError, match=r"model.int8.onnx exists; pass --force to overwrite it\."):
        quantize_ort(folder / "model.onnx", path, calib, session=session)
    with pytest.raises(UsageError, match=r"calibration method 'kl' is not one of minmax, entropy, percentile"):
        QuantSession(folder / "model.onnx", calib, "kl")
    wrong = default_images(2, Preprocess(input_size=96))
    with pytest.raises(UsageError, match=r"calibration images are 96x96 but the model takes 64x64"):
        QuantSession(folder / "model.onnx", wrong)


# --------------------------------------------------------------------------------------------------------
# the explicit Q/DQ ONNX for TensorRT
# --------------------------------------------------------------------------------------------------------


def test_qdq_is_symmetric_int8_on_weighted_inputs(qdq, graph):
    path, info = qdq
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    qdq_nodes = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq_nodes
    for n in qdq_nodes:
        zp = onnx.numpy_helper.to_array(inits[n.input[2]])
        assert inits[n.input[2]].data_type == onnx.TensorProto.INT8 and not zp.any()
    consumers = {i: n for n in proto.graph.node for i in n.input}
    # Q/DQ only in front of weighted ops: every DequantizeLinear feeds a Conv, MatMul or Gemm
    assert {consumers[n.output[0]].op_type for n in qdq_nodes if n.op_type == "DequantizeLinear"} <= {"Conv", "MatMul", "Gemm"}
    assert not any(inits[n.input[0]].data_type == onnx.TensorProto.INT32 for n in qdq_nodes if n.input[0] in inits)
    assert info["structure"]["per_channel_weights"] == 60 - 11 - 2  # T0's weighted ops minus SRM and head
    assert info["structure"]["contrib_ops"] == []
    fed = dq_fed_inputs(proto)
    assert all(fed[n] == 0 for n in info["excluded_node_names"] if n in fed)


def test_qdq_runs_on_cpu_and_agrees(qdq, calib, ref):
    top1, cos = agreement(ref, ort_logits(qdq[0], calib.images))
    assert top1 >= MIN_AGREEMENT and cos >= MIN_COSINE


def test_check_qdq_rejects_the_asymmetric_cpu_model(ort_int8):
    with pytest.raises(QuantizationError, match=r"is not a valid TensorRT Q/DQ model: \d+ problem\(s\), first: .*"
                                                 r"(zero point is not int8 0|int32 bias)"):
        check_qdq(ort_int8[0])


# --------------------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------------------


def test_cache_key_changes_with_model_calibration_and_preprocess(folder, calib, pp, tmp_path):
    base = CacheKey.of(folder / "model.onnx", calib, pp.to_dict(), method="minmax")
    assert base.digest() == CacheKey.of(folder / "model.onnx", calib, pp.to_dict(), method="minmax").digest()
    other_model = tmp_path / "other.onnx"
    other_model.write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    fewer = default_images(CALIB - 1, pp, seed=0)
    shifted = default_images(CALIB, pp, seed=0)
    shifted.images = shifted.images + np.float32(1e-3)
    variants = [
        CacheKey.of(other_model, calib, pp.to_dict(), method="minmax"),
        CacheKey.of(folder / "model.onnx", fewer, pp.to_dict(), method="minmax"),
        CacheKey.of(folder / "model.onnx", shifted, pp.to_dict(), method="minmax"),  # same source, other bytes
        CacheKey.of(folder / "model.onnx", calib, Preprocess(SIZE, crop_ratio=0.875).to_dict(), method="minmax"),
        CacheKey.of(folder / "model.onnx", calib, pp.to_dict(), method="entropy"),
    ]
    assert len({base.digest(), *(k.digest() for k in variants)}) == 1 + len(variants)


def test_stale_cache_is_deleted_not_read(folder, calib, pp, tmp_path):
    key = CacheKey.of(folder / "model.onnx", calib, pp.to_dict())
    cache = KeyedCache(tmp_path / "calib.cache", key)
    assert cache.status() == "miss" and cache.read_bytes() is None
    cache.write_bytes(b"ranges")
    assert cache.status() == "hit" and KeyedCache(cache.path, key).read_bytes() == b"ranges"
    cache.write_bytes(b"ranges, refreshed")  # a tool rewriting its own valid cache replaces it and its key
    assert cache.status() == "hit" and cache.read_bytes() == b"ranges, refreshed"
    assert json.loads(cache.key_path.read_text())["digest"] == key.digest()
    stale = KeyedCache(cache.path, CacheKey.of(folder / "model.onnx", calib, Preprocess(SIZE, interpolation="bilinear").to_dict()))
    assert stale.status() == "stale"
    assert stale.read_bytes() is None and not cache.path.exists() and not cache.key_path.exists()
    cache.path.write_bytes(b"written by a crashed run, no key")
    assert KeyedCache(cache.path, key).read_bytes() is None and not cache.path.exists()


def test_range_cache_is_reused_only_for_the_same_calibration(folder, calib, pp, tmp_path):
    def status(images):
        with QuantSession(folder / "model.onnx", images, "minmax", pp.to_dict(), cache_dir=tmp_path) as s:
            s.ranges()
            return s.cache_status

    assert status(calib) == "miss"
    assert status(calib) == "hit"
    assert status(default_images(8, pp, seed=5)) == "stale"  # recalibrated, and the old ranges are gone
    assert status(default_images(8, pp, seed=5)) == "hit"


@pytest.mark.skipif(__import__("runtimes.trt", fromlist=["x"]).tensorrt_status() is None,
                    reason="TensorRT is usable here; this checks the message where it is not")
def test_trt_calibrator_is_unreachable_without_tensorrt(folder, calib, pp, tmp_path):
    from calibration.trt_calibrator import entropy_calibrator

    with pytest.raises(BackendUnavailable, match="TensorRT"):
        entropy_calibrator(folder / "model.onnx", calib, tmp_path / "calib.cache", pp.to_dict())


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
    head = [n for n, o in by_name.items() if o.get_type_name() == "MatMul" and "logits" in {
        c.get_node().get_friendly_name() for c in o.output(0).get_target_inputs()} | {n}]
    assert len(head) == 1 and head[0] not in fq_fed
    assert by_name[head[0]].input_value(1).get_node().get_type_name() == "Constant"  # fp32 weights, no decompression
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


def int8_weight_range(model) -> tuple[int, int]:
    """Smallest and largest stored int8 weight of an NNCF-compressed IR."""
    values = [o.get_data() for o in model.get_ordered_ops()
              if o.get_type_name() == "Constant" and o.get_element_type().get_type_name() == "i8"]
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


# --------------------------------------------------------------------------------------------------------
# sensitivity
# --------------------------------------------------------------------------------------------------------


def test_sensitivity_ranks_units_and_stops_at_the_target(session, model, pp):
    # Held-out images and nothing float by default: on the calibration images the default policy already agrees
    # on every top-1. Measured here: 0.958 with everything quantized, 1.0 once the head and two merges are float.
    held = default_images(48, pp, seed=3).images
    with torch.inference_mode():
        held_ref = model(torch.from_numpy(held)).numpy()
    result = sensitivity_pass(session, held_ref, Target(top1_agreement=1.0), images=held, base=NO_EXCLUSIONS)
    assert result.base.drift.top1_agreement < 1.0
    ranked = [u for u, _ in result.ranking]
    assert sorted(ranked) == sorted(T0_UNITS)
    kls = [d.drift.mean_kl for _, d in result.ranking]
    assert kls == sorted(kls, reverse=True)
    assert result.kept_float == ranked[: len(result.kept_float)]  # worst first
    assert len(result.steps) == len(result.kept_float) + 1
    met = [Target(top1_agreement=1.0).met(d, None) for _, d in result.steps]
    assert met[-1] == result.met and not any(met[:-1])  # it stopped at the first step meeting the target
    policy = result.policy(NO_EXCLUSIONS)
    assert policy.units == tuple(result.kept_float) and set(policy.reasons) == set(result.kept_float)
    assert re.match(r"sensitivity rank 1 of 18; quantized alone: top-1 agreement", policy.reasons[ranked[0]])


def test_sensitivity_keeps_nothing_when_int8_already_meets_the_target(session, ref):
    result = sensitivity_pass(session, ref, Target(top1_agreement=0.5))
    assert result.met and result.kept_float == [] and len(result.steps) == 1
    assert result.ranking == []  # nothing to rank when everything quantized already meets the target


def test_sensitivity_checks_its_target():
    with pytest.raises(UsageError, match=r"needs a target: a top-1 agreement or a maximum accuracy drop"):
        Target()
    with pytest.raises(UsageError, match=r"maximum accuracy drop is a fraction in \[0, 1\) \(0.01 = one point\); got 1.5"):
        Target(max_accuracy_drop=1.5)


# --------------------------------------------------------------------------------------------------------
# the orchestration, on a real export folder
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_int8_artifacts_fills_folder_and_manifest(model, tmp_path, calib):
    from deploy import backends
    from deploy.backends import BuildContext
    from deploy.cli import main
    from deploy.int8 import Int8Request, build_int8_artifacts
    from deploy.reference import eager_from_manifest
    from export.manifest import Manifest
    from partialnet.console import SILENT
    from runtimes.trt import tensorrt_status

    checkpoint = tmp_path / "randomized.pth"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "export"
    assert main(["export", "partialnet_t0", "--checkpoint", str(checkpoint), "--input-size", str(SIZE),
                 "--output", str(out), "-q", "--no-validate", "--no-bench"]) == 0
    manifest = Manifest.load(out)
    eager = eager_from_manifest(manifest)

    def fp32(x):
        with torch.inference_mode():
            return eager(torch.from_numpy(x)).numpy()

    ctx = BuildContext(out, manifest, SILENT)
    targets = [backends.get(n) for n in ("onnxruntime", "openvino", "tensorrt")]
    report = build_int8_artifacts(ctx, targets, calib, None, fp32)
    rows = {a.key: a for a in manifest.artifacts}
    assert rows["onnxruntime/int8"].path == "model.int8.onnx" and rows["onnxruntime/int8"].scheme == "qdq"
    assert rows["openvino/int8"].path == "openvino/model.int8.xml" and rows["openvino/int8"].scheme == "nncf"
    assert rows["openvino/int8"].extra["weights"] == "openvino/model.int8.bin"
    qdq = rows["onnxruntime/int8@tensorrt"]
    assert qdq.path == "tensorrt/model.qdq.onnx" and qdq.precision == "int8" and qdq.scheme == "qdq-symmetric"
    assert qdq.target == "tensorrt"
    assert (out / "tensorrt" / "build.int8.sh").is_file()
    assert "--stronglyTyped" in (out / "tensorrt" / "build.int8.sh").read_text()
    if tensorrt_status() is not None:
        assert "tensorrt/int8" not in rows
        assert any(s["backend"] == "tensorrt" and s["precision"] == "int8" for s in manifest.skipped)
    for key in ("onnxruntime/int8", "openvino/int8", "onnxruntime/int8@tensorrt"):
        drift = report["artifacts"][key]["check"]["calibration"]["drift"]
        assert drift["top1_agreement"] >= MIN_AGREEMENT and drift["cosine_similarity"] >= MIN_COSINE, key
    assert report["policy"]["name"] == "default" and report["calibration"]["size"] == CALIB
    with pytest.raises(UsageError, match="needs labelled validation images"):
        build_int8_artifacts(ctx, targets[:1], calib, None, fp32, Int8Request(max_accuracy_drop=0.01))
    with pytest.raises(UsageError, match=r"no INT8 backend requested"):
        build_int8_artifacts(ctx, [], calib, None, fp32)


# --------------------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_loses_at_most_one_point_on_real_digits(tmp_path):
    from calibration.ov_int8 import OvQuantization, quantize_ov
    from calibration.sources import load_images
    from deploy.cli import main
    from realdata import digits_fixture
    from runtimes.ov import OpenVINORunner

    fx = digits_fixture()
    out = tmp_path / "digits"
    assert main(["export", fx.variant, "--checkpoint", str(fx.checkpoint), "--input-size", str(fx.input_size),
                 "--output", str(out), "-q", "--no-validate", "--no-bench"]) == 0
    pp = Preprocess(input_size=fx.input_size)
    calib = load_images(fx.train_dir, pp, limit=300, seed=0)
    test = load_images(fx.test_dir, pp)
    quantize_ort(out / "model.onnx", out / "model.int8.onnx", calib, preprocess=pp.to_dict())
    quantize_ov(out / "openvino" / "model.xml", out / "model.onnx", out / "openvino" / "model.int8.xml", calib)
    # accuracy control validates on other training images (the test set stays unseen) with a one-point budget
    val = load_images(fx.train_dir, pp, limit=200, seed=1)
    info = quantize_ov(out / "openvino" / "model.xml", out / "model.onnx", out / "openvino" / "model.ac.xml", calib,
                       OvQuantization(val=val, max_drop=0.01))
    assert info["mode"] == "quantize_with_accuracy_control" and info["fake_quantize"] > 0

    def top1(logits: np.ndarray) -> float:
        return float((logits.argmax(1) == test.labels).mean())

    results = {"onnxruntime": top1(ort_logits(out / "model.int8.onnx", test.images))}
    for name in ("model.int8.xml", "model.ac.xml"):
        runner = OpenVINORunner(out / "openvino" / name, precision="int8")
        results[f"openvino {name}"] = top1(runner.run({"input": test.images})["logits"])
    for what, acc in results.items():
        assert acc >= fx.eager_top1 - 0.01, f"{what} INT8 top-1 {acc:.4f} vs eager {fx.eager_top1:.4f}"
