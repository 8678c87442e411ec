"""The shared float policy: parts and units resolved on the exported graph, the same units on both backends.

The model is PartialNet-T0 with randomized BatchNorm statistics, affines and iRPE tables, 10 classes, exported at
64 px (tests/calibration/conftest.py).
"""
from __future__ import annotations

from collections import Counter

import onnx
import pytest

from calibration.policy import PARTS, FloatPolicy, OnnxGraph, OvIndex, unit_of_name
from calibration.rewrites import rescale_gate_rows, split_gate_rows
from partialnet.errors import UsageError
from int8_fixtures import T0_UNITS, BLOCK



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
