"""The one INT8 exclusion policy every backend uses: which numerically sensitive parts of PartialNet stay in float.

A policy names *parts* (kinds of sub-graph found in every block of a kind, e.g. the SRM statistics path) and
*units* (whole blocks or stem/merge/head modules, e.g. "stages.4.blocks.3"). Both are resolved on the ONNX graph:

* parts by structure (op types and how they connect), so a renamed node still matches;
* units by the module scope the exporter records: the torchscript exporter names nodes
  `/stages/stages.4/blocks/blocks.3/mlp/fc1/Conv`; the dynamo exporter stores the scope in the node's
  `pkg.torch.onnx.name_scopes` metadata, which onnxsim drops, so a weighted node also takes the unit in its
  weight's parameter name (`stages.4.blocks.3.mlp.fc1.weight`); other nodes take the unit their neighbours
  agree on (the consumers' where the producers belong to the previous unit).

The result is a set of ONNX node names (`onnx_nodes_to_exclude`, for onnxruntime.quantization's nodes_to_exclude)
or an `nncf.IgnoredScope` of OpenVINO op names (`ov_ignored_scope`). OpenVINO keeps ONNX node names as op names
(a Conv with bias becomes `<name>/WithoutBiases` plus an Add called `<name>`), fuses some groups into one op
named after the group's last node (Gelu, ScaledDotProductAttention) and gives a few ops fresh names (`MVN_919`):
an ONNX node with no op of its name is mapped to the op that absorbed it downstream, and a freshly named op to
the unit of its neighbours.
"""
from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import onnx

from partialnet.errors import UsageError

# What each part covers. In a QDQ graph a tensor is quantized when any node touching it is quantized, so a part
# lists every node whose quantization would put the sensitive tensor through 8 bits, not only the op it is named
# after (Softmax alone in float would still see its probabilities quantized by the MatMul that reads them).
PARTS: dict[str, str] = {
    "softmax": "PAT_sf attention probabilities: Softmax and the attn@v MatMul that reads them",
    "layernorm": "PAT_sf LayerNormalization (no affine) and the qkv projection that reads its output",
    "attn_bias": "PAT_sf attention logits: the q@k^T MatMul and the baked relative-position bias Add",
    "srm_stats": "PAT_ch SRM gate: mean/std statistics -> cfc1 conv -> Clip gate (OpenVINO: the conv and Clip; "
                 "the statistics read the dequantized block input)",
    "sp_gate": "PAT_sp gate: the Clip (or rescaled HardSigmoid) of the merged conv's gate row, that row's own "
               "conv where calibration.rewrites split it off, the gating Mul and the post-gate shift Add",
    "head": "head: global pool -> 1x1 conv -> activation -> Linear",
    "act_matmul": "activation x activation MatMuls (both inputs computed, no weight): attention scores and their "
                  "application in DANet, EMA, SCSA and PAT_sf, where one 8-bit grid per tensor flattens the scores",
    "sp_tail": "PAT_sp tail as a whole: sp_gate plus the Split of the merged conv's C+1 rows and the Concat after "
               "the gating (OpenVINO adds it for speed, see calibration.ov_int8)",
}

_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)$")
_UNIT = re.compile(r"^(patch_embed|head|stages\.\d+(\.blocks\.\d+)?)$")
_TS_BLOCK = re.compile(r"^/stages/stages\.(\d+)/blocks/blocks\.(\d+)/")
_TS_STAGE = re.compile(r"^/stages/stages\.(\d+)/")
_SRM_OPS = {"Conv", "Concat", "Sqrt", "Mul", "ReduceMean", "Sub", "Add", "Div", "Pow"}
_SRM_MAX_NODES = 16
_SRM_GATE_OPS = {"Conv", "Clip"}  # of srm_stats, what OpenVINO keeps in float (see FloatPolicy.ov_ignored_names)
_WEIGHTED = {"Conv", "MatMul", "Gemm"}
_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}
OV_BIAS_SUFFIX = "/WithoutBiases"


def check_unit(name: str) -> str:
    """`name` if it names a unit ("stages.4.blocks.3", "stages.1", "patch_embed", "head"), else a UsageError."""
    if not _UNIT.match(name):
        raise UsageError(
            f"{name!r} is not a unit name; use 'stages.<i>.blocks.<j>' for a block, 'stages.<i>' for a patch "
            f"merging, 'patch_embed' or 'head'."
        )
    return name


def _unit_from_scopes(scopes: list[str]) -> str | None:
    """The deepest unit among a node's module scopes (dynamo's name_scopes metadata)."""
    found = None
    for s in scopes:
        if _BLOCK.match(s) or re.match(r"^stages\.\d+$", s) or s in ("patch_embed", "head"):
            found = s
        elif s == "avgpool_pre_head":
            found = "head"
    return found


def unit_of_name(name: str) -> str | None:
    """The unit a torchscript-exported node (or an OpenVINO op keeping its name) belongs to, from its scope path."""
    m = _TS_BLOCK.match(name)
    if m:
        return f"stages.{m.group(1)}.blocks.{m.group(2)}"
    m = _TS_STAGE.match(name)
    if m:
        return f"stages.{m.group(1)}"
    if name.startswith("/patch_embed/"):
        return "patch_embed"
    if name.startswith(("/avgpool_pre_head/", "/head/")):
        return "head"
    return None


def _unit_from_weight(node: onnx.NodeProto, constants: set[str]) -> str | None:
    """The unit in a weight's parameter name ('stages.4.blocks.3.mlp.fc1.weight'), which survives onnxsim."""
    for name in node.input[1:2]:
        if name in constants:
            parts = name.split(".")
            return _unit_from_scopes([".".join(parts[:i]) for i in range(1, len(parts))])
    return None


def _unit_from_metadata(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return _unit_from_scopes([str(s) for s in scopes])
    return None


def _infer_from_neighbours(
    labels: dict[str, str | None], producers: dict[str, set[str]], consumers: dict[str, set[str]]
) -> None:
    """Give each unlabelled node the unit its labelled neighbours share; where producers and consumers disagree
    (the Split opening a block reads the previous block's output), the consumers' unit. Repeat until stable."""
    changed = True
    while changed:
        changed = False
        for name, unit in labels.items():
            if unit is not None:
                continue
            ins = {labels[n] for n in producers.get(name, ()) if labels.get(n) is not None}
            outs = {labels[n] for n in consumers.get(name, ()) if labels.get(n) is not None}
            seen = ins | outs
            if len(seen) == 1 or len(outs) == 1:
                labels[name] = (seen if len(seen) == 1 else outs).pop()
                changed = True


class OnnxGraph:
    """Producers, consumers, constants and the unit of every node of one ONNX graph."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = [n for n in g.node if n.op_type != "Constant"]
        unnamed = [n.op_type for n in self.nodes if not n.name]
        if unnamed:
            raise UsageError(
                f"the ONNX graph has {len(unnamed)} unnamed nodes ({', '.join(sorted(set(unnamed)))}); INT8 "
                f"exclusions work by node name, so export it with 'deploy export' (which names every node)."
            )
        self.by_name = {n.name: n for n in self.nodes}
        self.init_dims = {t.name: tuple(t.dims) for t in g.initializer}
        self.constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                if i and i not in self.constants:
                    self.consumers.setdefault(i, []).append(n)
        self.units = self._units()

    def dynamic_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and i not in self.constants]

    def producers_of(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [self.producer[i] for i in self.dynamic_inputs(node) if i in self.producer]

    def consumers_of(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [c for o in node.output for c in self.consumers.get(o, [])]

    def _units(self) -> dict[str, str | None]:
        labels = {n.name: unit_of_name(n.name) or _unit_from_metadata(n) or _unit_from_weight(n, self.constants)
                  for n in self.nodes}
        producers = {n.name: {p.name for p in self.producers_of(n)} for n in self.nodes}
        consumers = {n.name: {c.name for c in self.consumers_of(n)} for n in self.nodes}
        _infer_from_neighbours(labels, producers, consumers)
        return labels

    def unit_names(self) -> list[str]:
        """Every unit present, in graph order."""
        out: list[str] = []
        for n in self.nodes:
            u = self.units.get(n.name)
            if u is not None and u not in out:
                out.append(u)
        return out

    # ---------------------------------------------------------------------------------------------- parts

    def part_nodes(self, part: str) -> set[str]:
        """Names of the nodes that make up `part` (see PARTS) anywhere in the graph."""
        finder = {
            "softmax": self._softmax,
            "layernorm": self._layernorm,
            "attn_bias": self._attn_logits,
            "srm_stats": self._srm_stats,
            "sp_gate": self._sp_gate,
            "sp_tail": self._sp_tail,
            "head": self._head,
            "act_matmul": self._act_matmul,
        }.get(part)
        if finder is None:
            raise UsageError(f"unknown INT8 policy part {part!r}; parts are {', '.join(PARTS)}.")
        return {n.name for n in finder()}

    def _weighted_readers(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """Weighted ops reading `node`'s output directly or through reshapes/transposes."""
        out, queue = [], deque(self.consumers_of(node))
        while queue:
            c = queue.popleft()
            if c.op_type in _WEIGHTED:
                out.append(c)
            elif c.op_type in _PASS_THROUGH:
                out.append(c)
                queue.extend(self.consumers_of(c))
        return out

    def _softmax(self) -> list[onnx.NodeProto]:
        out = []
        for s in (n for n in self.nodes if n.op_type == "Softmax"):
            out.append(s)
            out.extend(c for c in self.consumers_of(s) if c.op_type == "MatMul")
        return out

    def _layernorm(self) -> list[onnx.NodeProto]:
        out = []
        for ln in (n for n in self.nodes if n.op_type == "LayerNormalization"):
            out.append(ln)
            out.extend(self._weighted_readers(ln))
        return out

    def _attn_logits(self) -> list[onnx.NodeProto]:
        out = []
        for s in (n for n in self.nodes if n.op_type == "Softmax"):
            p = self.producer.get(s.input[0])
            if p is not None and p.op_type == "Add" and len(self.dynamic_inputs(p)) == 1:
                out.append(p)  # the baked bias: one input is a constant [1, heads, N, N]
                p = self.producer.get(self.dynamic_inputs(p)[0])
            if p is not None and p.op_type == "MatMul" and len(self.dynamic_inputs(p)) == 2:
                out.append(p)
        return out

    def _act_matmul(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == "MatMul" and len(self.dynamic_inputs(n)) == 2]

    def _srm_stats(self) -> list[onnx.NodeProto]:
        out = []
        for clip in (n for n in self.nodes if n.op_type == "Clip"):
            region, queue = [clip], deque(self.producers_of(clip))
            seen = {clip.name}
            while queue and len(region) <= _SRM_MAX_NODES:
                p = queue.popleft()
                if p.name in seen or p.op_type not in _SRM_OPS:
                    continue
                seen.add(p.name)
                region.append(p)
                queue.extend(self.producers_of(p))
            ops = {n.op_type for n in region}
            if len(region) <= _SRM_MAX_NODES and {"ReduceMean", "Conv"} <= ops:
                out.extend(region)
        return out

    def _sp_gate(self) -> list[onnx.NodeProto]:
        out = []
        # a HardSigmoid is the Clip once calibration.rewrites.rescale_gate_rows has rescaled the gate row
        for clip in (n for n in self.nodes if n.op_type in ("Clip", "HardSigmoid")):
            p = self.producer.get(clip.input[0])
            if p is not None and p.op_type == "Conv" and self.init_dims.get(p.input[1], (0,))[0] == 1:
                out.append(p)  # the gate row as its own conv (calibration.rewrites.split_gate_rows)
            elif p is None or p.op_type != "Split":
                continue
            out.append(clip)
            for mul in (c for c in self.consumers_of(clip) if c.op_type == "Mul"):
                out.append(mul)
                out.extend(a for a in self.consumers_of(mul) if a.op_type == "Add" and len(self.dynamic_inputs(a)) == 1)
        return out

    def _sp_tail(self) -> list[onnx.NodeProto]:
        gate = self._sp_gate()
        out = list(gate)
        for n in gate:
            if n.op_type in ("Clip", "HardSigmoid"):
                out.extend(p for p in self.producers_of(n) if p.op_type == "Split")
            if n.op_type in ("Mul", "Add"):
                out.extend(c for c in self.consumers_of(n) if c.op_type == "Concat")
        return list({n.name: n for n in out}.values())

    def _head(self) -> list[onnx.NodeProto]:
        pools = [n for n in self.nodes if n.op_type == "GlobalAveragePool"]
        if not pools:
            return [n for n in self.nodes if self.units.get(n.name) == "head"]
        region, queue, seen = [], deque([pools[-1]]), set()
        while queue:
            n = queue.popleft()
            if n.name in seen:
                continue
            seen.add(n.name)
            region.append(n)
            queue.extend(self.consumers_of(n))
        return region


@dataclass(frozen=True)
class FloatPolicy:
    """Parts and units kept in float, with the measurement that put each one there."""

    parts: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise UsageError(f"unknown INT8 policy part(s) {', '.join(unknown)}; parts are {', '.join(PARTS)}.")
        for u in self.units:
            check_unit(u)

    def with_units(self, units: Iterable[str], reasons: Mapping[str, str] | None = None, name: str | None = None) -> "FloatPolicy":
        """This policy with more units kept in float."""
        merged = tuple(dict.fromkeys([*self.units, *units]))
        return replace(self, units=merged, reasons={**self.reasons, **(reasons or {})}, name=name or self.name)

    def with_parts(self, parts: Iterable[str], reasons: Mapping[str, str] | None = None, name: str | None = None) -> "FloatPolicy":
        """This policy with more parts kept in float."""
        merged = tuple(dict.fromkeys([*self.parts, *parts]))
        return replace(self, parts=merged, reasons={**self.reasons, **(reasons or {})}, name=name or self.name)

    def onnx_nodes_to_exclude(self, model: onnx.ModelProto | OnnxGraph) -> list[str]:
        """ONNX node names to keep in float (onnxruntime.quantization's nodes_to_exclude), in graph order."""
        graph = model if isinstance(model, OnnxGraph) else OnnxGraph(model)
        present = set(graph.unit_names())
        missing = [u for u in self.units if u not in present]
        if missing:
            raise UsageError(
                f"policy keeps {', '.join(missing)} in float but the graph has no such unit (it has "
                f"{', '.join(graph.unit_names())})."
            )
        names: set[str] = set()
        for part in self.parts:
            names |= graph.part_nodes(part)
        wanted = set(self.units)
        names |= {n.name for n in graph.nodes if graph.units.get(n.name) in wanted}
        return [n.name for n in graph.nodes if n.name in names]

    def ov_ignored_names(self, ov_model: Any, onnx_model: onnx.ModelProto | OnnxGraph) -> list[str]:
        """OpenVINO op names realizing this policy's ONNX nodes in `ov_model` (converted from `onnx_model`)."""
        graph = onnx_model if isinstance(onnx_model, OnnxGraph) else OnnxGraph(onnx_model)
        excluded = set(self.onnx_nodes_to_exclude(graph))
        if "srm_stats" in self.parts:
            # OpenVINO keeps only the gate's conv and Clip of srm_stats in float. Ignoring the statistics ops too
            # makes NNCF keep a float copy of the block input for them, so the input's other readers (the
            # partial conv, the gating Mul, the residual Add) each get their own FakeQuantize after an f32 Split:
            # T0 INT8 was 9% slower that way, with the same logit error (cosine 1 - 2.9e-4 both ways on 256
            # held-out images). The statistics still run in f32, on the dequantized tensor.
            in_units = {n.name for n in graph.nodes if graph.units.get(n.name) in set(self.units)}
            stats = {n for n in graph.part_nodes("srm_stats") if graph.by_name[n].op_type not in _SRM_GATE_OPS}
            excluded -= stats - in_units
        index = OvIndex(ov_model, graph)
        names = {op for op, origin in index.origin.items() if origin in excluded}
        for onnx_name in excluded - set(index.present):
            absorber = index.absorber(onnx_name)
            if absorber is not None:
                names |= {op for op, origin in index.origin.items() if origin == absorber}
        wanted = set(self.units)
        names |= {op for op, unit in index.unnamed_units.items() if unit in wanted}
        return sorted(names)

    def ov_ignored_scope(self, ov_model: Any, onnx_model: onnx.ModelProto | OnnxGraph) -> Any:
        """This policy as an `nncf.IgnoredScope` of op names that all exist in `ov_model` (validated by NNCF)."""
        import nncf

        return nncf.IgnoredScope(names=self.ov_ignored_names(ov_model, onnx_model), validate=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "float_parts": {p: PARTS[p] for p in self.parts},
            "float_units": list(self.units),
            "reasons": dict(self.reasons),
        }


class OvIndex:
    """For each op of an OpenVINO model converted from an ONNX graph, the ONNX node it came from."""

    def __init__(self, ov_model: Any, graph: OnnxGraph):
        self.graph = graph
        self.origin: dict[str, str | None] = {}
        ops = [o for o in ov_model.get_ordered_ops() if o.get_type_name() not in ("Constant", "Parameter", "Result")]
        names_taken = {o.get_friendly_name() for o in ops}
        for op in ops:
            name = op.get_friendly_name()
            base = name[: -len(OV_BIAS_SUFFIX)] if name.endswith(OV_BIAS_SUFFIX) else name
            if base in graph.by_name:
                self.origin[name] = base
            elif base in graph.producer and graph.producer[base].name not in names_taken:
                # The op feeding a model output is named after the output tensor ("logits"), not its ONNX node.
                self.origin[name] = graph.producer[base].name
            else:
                self.origin[name] = None
        self.present = {o for o in self.origin.values() if o is not None}
        labels = {n: (graph.units.get(o) if o else unit_of_name(n)) for n, o in self.origin.items()}
        producers: dict[str, set[str]] = {n: set() for n in self.origin}
        consumers: dict[str, set[str]] = {n: set() for n in self.origin}
        for op in ops:
            me = op.get_friendly_name()
            for port in op.inputs():
                src = port.get_source_output().get_node().get_friendly_name()
                if src in producers:
                    producers[me].add(src)
                    consumers[src].add(me)
        _infer_from_neighbours(labels, producers, consumers)
        self.unnamed_units = {n: labels[n] for n, o in self.origin.items() if o is None}

    def absorber(self, onnx_name: str) -> str | None:
        """The nearest ONNX node downstream of `onnx_name` that has an op of its own in the OpenVINO model."""
        g = self.graph
        queue, seen = deque(g.consumers_of(g.by_name[onnx_name])), set()
        while queue:
            n = queue.popleft()
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.name in self.present:
                return n.name
            queue.extend(g.consumers_of(n))
        return None


# Chosen by measurement: benchmarks/int8.py, each backend's INT8 against its own FP32 on held-out images (mean
# logit cosine unless said otherwise), on T0 at 224 px, the tiny official checkpoint and the digits model.
# softmax, layernorm and attn_bias changed nothing measurable on any model or backend; sp_gate, once its row has a
# conv and an 8-bit grid of its own (calibration.rewrites), gained at most 0.0004 cosine and cost onnxruntime
# 0.6 ms of 5.7 (a float conv amid NHWC int8 convs needs layout transposes).
DEFAULT_REASONS: dict[str, str] = {
    "srm_stats": "measured: OpenVINO cosine 0.9924 -> 0.9988 (T0 224 px), 0.9222 -> 0.9801 (tiny official), "
                 "0.9977 -> 0.9995 (digits); onnxruntime 0.9892 -> 0.9946 (tiny official); costs ~0.4 ms on "
                 "onnxruntime, nothing measurable on OpenVINO",
    "head": "measured: onnxruntime max |logit error| 2.41 -> 0.62 (T0 224 px), 0.28 -> 0.09 (digits); costs ~0.3 ms "
            "on onnxruntime (the 1280x1000 Linear in float)",
    "act_matmul": "measured (benchmarks/MODULES.md, conformance CNNs at 64 px): onnxruntime DANet max |logit error| "
                  "0.089 -> 0.018, cosine 0.9998 -> 1.0000; EMA top-1 agreement 0.992 -> 1.000; SCSA unchanged; "
                  "OpenVINO unchanged on all three. In PartialNet these are PAT_sf's q@k and attn@v (49 tokens at "
                  "224 px), measured neutral as softmax/attn_bias",
}
DEFAULT_PARTS: tuple[str, ...] = tuple(DEFAULT_REASONS)
DEFAULT_POLICY = FloatPolicy(parts=DEFAULT_PARTS, reasons=DEFAULT_REASONS, name="default")
NO_EXCLUSIONS = FloatPolicy(name="quantize-everything")
