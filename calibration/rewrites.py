"""Exact graph rewrites that make PartialNet's deploy ONNX quantize well; every rewrite keeps each output value.

* `fuse_gelu`: the exported erf-GELU (Div, Erf, Add, Mul, Mul) as one `com.microsoft.Gelu` (onnxruntime only).
  onnxruntime duplicates a DequantizeLinear that feeds two nodes (its EnsureUniqueDQForNodeUnit pass), which
  breaks its own Gelu fusion in a QDQ graph; fused beforehand, nothing is left to break.
* `split_gate_rows` / `rescale_gate_rows`: PAT_sp's gate-logit row of the merged C+1-row conv (spec §6b) as a
  conv of its own (for calibration), or stretched over the conv's 8-bit grid (for onnxruntime's INT8), so that
  quantizing the big conv's output does not leave the [0, 1] gate on the features' coarse grid.
* `unshare_float_consumers`: after quantization, float consumers of a quantized tensor read the float original
  instead of its DequantizeLinear (onnxruntime.quantization rewires every consumer).
* `unshare_weight_dequantizers`: after quantization, a weight read by several ops (a shared module, e.g. CBAM's
  MLP on the average- and the max-pooled map) gets one copy and one DequantizeLinear per reader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from partialnet.errors import DeployError

from .policy import OnnxGraph

MS_DOMAIN = "com.microsoft"


def _replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Make `nodes` (copied first: they may be views into the list being cleared) the graph's node list."""
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant-node output, or None if `name` is computed."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _scalar(model: onnx.ModelProto, name: str, want: float) -> bool:
    v = _constant(model, name)
    return v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - want) < 1e-4


def _prune(model: onnx.ModelProto, stale: set[str] = frozenset()) -> None:
    """Drop initializers and Constant nodes no node reads, and shape annotations of removed or reshaped tensors."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    nodes = [n for n in model.graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    if len(nodes) != len(model.graph.node):
        _replace_nodes(model, nodes)
    produced = {o for n in model.graph.node for o in n.output}
    inits = [t for t in model.graph.initializer if t.name in used]
    if len(inits) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
    infos = [v for v in model.graph.value_info if v.name in produced and v.name not in stale]
    if len(infos) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(infos)


def fuse_gelu(model: onnx.ModelProto) -> int:
    """Replace each exact erf-GELU `x/√2 -> Erf -> +1 -> *x -> *0.5` by one com.microsoft.Gelu node, in place.

    The new node is named `<scope>/Gelu` after the GELU's scope, so it stays in its block. Returns how many.
    """
    g = OnnxGraph(model)
    found: list[tuple[list[onnx.NodeProto], onnx.NodeProto]] = []
    for erf in (n for n in g.nodes if n.op_type == "Erf"):
        div = g.producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not _scalar(model, div.input[1], 2**0.5):
            continue
        x = div.input[0]
        chain = [div, erf]
        ok = True
        for op, const in (("Add", 1.0), ("Mul", None), ("Mul", 0.5)):
            users = g.consumers_of(chain[-1])
            if len(users) != 1 or users[0].op_type != op:
                ok = False
                break
            node = users[0]
            other = [i for i in node.input if i != chain[-1].output[0]]
            if len(other) != 1 or (const is None and other[0] != x) or (
                const is not None and not _scalar(model, other[0], const)
            ):
                ok = False
                break
            chain.append(node)
        if ok:
            scope = chain[-1].name.rsplit("/", 1)[0] if "/" in chain[-1].name else chain[-1].name
            gelu = helper.make_node("Gelu", [x], [chain[-1].output[0]], name=f"{scope}/Gelu", domain=MS_DOMAIN)
            found.append((chain, gelu))
    if not found:
        return 0
    drop = {n.name for chain, _ in found for n in chain}
    anchor = {chain[-1].name: gelu for chain, gelu in found}
    nodes = [anchor.get(n.name, n) for n in model.graph.node if n.name in anchor or not n.name or n.name not in drop]
    _replace_nodes(model, nodes)
    _prune(model)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(found)


@dataclass
class _MergedGate:
    """One merged PAT_sp conv: `Conv_{2C->C+1} -> Split([C/2, 1, C/2]) -> Clip` on the middle row (spec §6b)."""

    conv: onnx.NodeProto
    split: onnx.NodeProto
    clip: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray
    row: int


def _merged_gates(model: onnx.ModelProto) -> list[_MergedGate]:
    g = OnnxGraph(model)
    found = []
    for clip in (n for n in g.nodes if n.op_type == "Clip"):
        split = g.producer.get(clip.input[0])
        if split is None or split.op_type != "Split" or len(split.output) != 3 or clip.input[0] != split.output[1]:
            continue
        conv = g.producer.get(split.input[0])
        sizes = _constant(model, split.input[1]) if len(split.input) > 1 else None
        if conv is None or conv.op_type != "Conv" or sizes is None or len(g.consumers.get(conv.output[0], [])) != 1:
            continue
        w = _constant(model, conv.input[1])
        b = _constant(model, conv.input[2]) if len(conv.input) > 2 else None
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        parts = sizes.astype(np.int64).reshape(-1)
        if w is None or (len(conv.input) > 2 and b is None) or axis != 1 or parts.size != 3 or parts[1] != 1:
            continue
        found.append(_MergedGate(conv, split, clip, w, np.zeros(w.shape[0], w.dtype) if b is None else b, int(parts[0])))
    return found


def split_gate_rows(model: onnx.ModelProto) -> int:
    """Give each merged PAT_sp conv's gate-logit row a conv of its own, in place; returns how many were split.

    The row moves to `<conv>_gate: Conv_{2C->1}(h)` (same input, same arithmetic) and the big conv keeps C rows.
    Calibrating this form gives the C feature rows a range of their own, without the gate logit in it, which
    `rescale_gate_rows` needs; it also lets a policy keep the gate conv alone in float. Exact.
    """
    gates = _merged_gates(model)
    new_inits: list[onnx.TensorProto] = []
    stale: set[str] = set()
    for m in gates:
        conv, split, w, b, row = m.conv, m.split, m.weight, m.bias, m.row
        keep = np.r_[0:row, row + 1 : w.shape[0]]
        names = {k: f"{conv.name}/{k}" for k in ("main_w", "main_b", "gate_w", "gate_b", "sizes")}
        new_inits += [
            numpy_helper.from_array(np.ascontiguousarray(w[keep]), names["main_w"]),
            numpy_helper.from_array(np.ascontiguousarray(b[keep]), names["main_b"]),
            numpy_helper.from_array(np.ascontiguousarray(w[row : row + 1]), names["gate_w"]),
            numpy_helper.from_array(np.ascontiguousarray(b[row : row + 1]), names["gate_b"]),
            numpy_helper.from_array(np.array([row, w.shape[0] - row - 1], np.int64), names["sizes"]),
        ]
        gate = onnx.NodeProto()
        gate.CopyFrom(conv)
        gate.name = f"{conv.name}_gate"
        del gate.input[:]
        gate.input.extend([conv.input[0], names["gate_w"], names["gate_b"]])
        del gate.output[:]
        gate.output.append(split.output[1])
        del conv.input[1:]
        conv.input.extend([names["main_w"], names["main_b"]])
        split.input[1] = names["sizes"]
        gated, plain = split.output[0], split.output[2]
        del split.output[:]
        split.output.extend([gated, plain])
        model.graph.node.append(gate)
        stale.update([conv.output[0], gated, plain])
    if gates:
        model.graph.initializer.extend(new_inits)
        _prune(model, stale)
        _topological_sort(model)
    return len(gates)


def rescale_gate_rows(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]]) -> int:
    """Stretch each merged conv's gate row over its tensor's 8-bit grid, in place; returns how many were rescaled.

    Quantizing `z = Conv_{2C->C+1}(h)` per tensor puts the gate logit on the C features' grid: with features in
    [rmin, rmax] a [0, 1] gate moved in steps of (rmax - rmin) / 255, the largest INT8 error measured in T0.
    Here the gate row's weight and bias are multiplied by k = rmax (the features' calibrated maximum, from
    `ranges` of the split form, where the conv's output holds only the feature rows) and the gate's
    `Clip(., 0, 1)` becomes `HardSigmoid(alpha=1/k, beta=0)` = clamp(. / k, 0, 1), still one op: the useful
    interval [0, 1] now spans [0, rmax] of the grid, and a logit beyond it saturates to a value the clamp would
    have clamped anyway (rmin <= 0 <= rmax). In float it is exact up to rounding.
    """
    done = 0
    for m in _merged_gates(model):
        rng = ranges.get(m.conv.output[0])
        if rng is None or not rng[1] > 0 or not rng[0] <= 0 or not _is_unit_clip(model, m.clip):
            continue
        k = float(rng[1])
        w, b = m.weight.copy(), m.bias.copy()
        w[m.row] *= k
        b[m.row] *= k
        names = (f"{m.conv.name}/rescaled_w", f"{m.conv.name}/rescaled_b")
        model.graph.initializer.extend([numpy_helper.from_array(w, names[0]), numpy_helper.from_array(b, names[1])])
        del m.conv.input[1:]
        m.conv.input.extend(names)
        m.clip.op_type = "HardSigmoid"
        del m.clip.input[1:]
        del m.clip.attribute[:]
        m.clip.attribute.extend([helper.make_attribute("alpha", 1.0 / k), helper.make_attribute("beta", 0.0)])
        done += 1
    if done:
        _prune(model)
    return done


def _is_unit_clip(model: onnx.ModelProto, clip: onnx.NodeProto) -> bool:
    """Whether a Clip clamps to exactly [0, 1] (opset >= 11 bounds are inputs)."""
    lo = _constant(model, clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
    hi = _constant(model, clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
    return lo is not None and hi is not None and float(lo) == 0.0 and float(hi) == 1.0


def _topological_sort(model: onnx.ModelProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (ONNX requires it)."""
    nodes = list(model.graph.node)
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered: list[onnx.NodeProto] = []
    pending = nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise DeployError(f"the rewritten graph has a cycle or a missing input near node {rest[0].name!r}.")
        pending = rest
    _replace_nodes(model, ordered)


def unshare_float_consumers(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Let float consumers of a quantized tensor read the float original instead of its DequantizeLinear; in place.

    onnxruntime.quantization gives every consumer of a quantized tensor the dequantized value, so a residual Add
    or a node kept in float that shares its input with a quantized conv would see 8-bit noise. A tensor produced
    by a quantized op is left alone: there the float value does not exist once QLinearConv is fused. Returns how
    many inputs were rewired.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    rewired = 0
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or dq.output[0] in outputs:
            continue
        source = q.input[0]
        origin = producer.get(source)
        if origin is not None and origin.name in quantized:
            continue
        for node in model.graph.node:
            if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            for i, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[i] = source
                    rewired += 1
    if rewired:
        used = {i for n in model.graph.node for i in n.input} | outputs
        keep = [n for n in model.graph.node if n.op_type != "DequantizeLinear" or n.output[0] in used]
        if len(keep) != len(model.graph.node):
            _replace_nodes(model, keep)
    return rewired


def unshare_weight_dequantizers(model: onnx.ModelProto) -> int:
    """Give every reader of a shared quantized weight its own copy of the weight and its DequantizeLinear; in place.

    onnxruntime's exact int8 mode (`session.x64quantprecision`, on for CPUs without VNNI, see runtimes.cpu)
    converts each QLinearConv's int8 weight to uint8 under a name derived from the weight's, so a weight two convs
    share is added twice and the session fails to load ("Attempt to replace the existing tensor"). Copies cost only
    the shared weights' bytes again. Returns how many readers got a copy.
    """
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    taken = {n.name for n in model.graph.node} | set(inits) | {o for n in model.graph.node for o in n.output}

    def fresh(base: str) -> str:
        k = 1
        while f"{base}_copy{k}" in taken:
            k += 1
        taken.add(f"{base}_copy{k}")
        return f"{base}_copy{k}"

    nodes, copies = [], 0
    for dq in model.graph.node:
        nodes.append(dq)
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        for reader in readers.get(dq.output[0], [])[1:]:
            names = []
            for name in dq.input:
                if name in inits:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(inits[name])
                    copy.name = fresh(name)
                    model.graph.initializer.append(copy)
                    names.append(copy.name)
                else:
                    names.append(name)
            twin = onnx.NodeProto()
            twin.CopyFrom(dq)
            twin.name, twin.output[0] = fresh(dq.name), fresh(dq.output[0])
            twin.input[:] = names
            for i, name in enumerate(reader.input):
                if name == dq.output[0]:
                    reader.input[i] = twin.output[0]
            nodes.append(twin)
            copies += 1
    if copies:
        _replace_nodes(model, nodes)
    return copies
