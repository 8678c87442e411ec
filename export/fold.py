"""Reparameterization of any classifier, found from its graph (torch.fx), not from class names.

Every eval-mode BatchNorm becomes a per-channel affine `y = s*x + t` (`ChannelAffine`), and the passes below move
the affines into the linear maps beside them until none moves, each an exact identity in real numbers computed
in float64 (the fold math of export/reparam.py):

* conv -> affine, linear -> affine: the affine folds into the weights and bias (Conv+BN, Linear+BN);
* affine -> affine, `x * p` with a per-channel constant p -> affine: composed (BN+BN, BN after a channel-wise
  scale such as a layer scale);
* affine -> conv with no padding, affine -> linear: into the input columns (BN+Conv, exact only without
  padding: a padded conv would see the shift at the borders);
* cat(..., affine(x), ...) -> 1x1 conv: into that slice of the conv's input columns (PATConv's BN after the gated
  channels, wherever the block sits);
* affine over a cat: split into one affine per input, which then fold into their producers (BN over a concat).

What stays is an explicit Mul and Add, so no BatchNormalization is left in the graph. Dropout, Identity and other
train-only layers in eval form disappear. A model fx cannot trace (data-dependent control flow) is a one-line
error naming the module and the line of code.
"""
from __future__ import annotations

import copy
import operator
import re
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from partialnet.errors import DeployError

from .reparam import _bn_affine64, _f64, _require_finite_after_folding

TRAIN_ONLY = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
TRAIN_ONLY_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)


class TraceError(DeployError):
    """The model's forward cannot be turned into one static graph."""


class ChannelAffine(nn.Module):
    """`x * scale + shift` per channel (dim 1): an eval BatchNorm, or what is left of several after folding."""

    def __init__(self, scale: Tensor, shift: Tensor, rank: int):
        super().__init__()
        view = (-1,) + (1,) * (rank - 2)
        self.register_buffer("scale", scale.reshape(view).clone())
        self.register_buffer("shift", shift.reshape(view).clone())
        self.refresh()

    def refresh(self) -> None:
        """A shift of zeros (a folded constant scale) exports as one Mul, not Mul + Add."""
        self.has_shift = bool(self.shift.any())

    @property
    def channels(self) -> int:
        return self.scale.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift if self.has_shift else x * self.scale


@dataclass
class FoldSummary:
    """What the graph passes did (for the export report)."""

    input_size: int
    batchnorms: int = 0
    folds: dict[str, int] = field(default_factory=dict)
    affines_left: int = 0
    train_only_removed: int = 0
    params_before: int = 0
    params_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- tracing


class _Tracer(fx.Tracer):
    """fx's tracer that remembers which module each node came from (for error messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m) if self.stack or m is not self.root else "", m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["module_path"] = self.stack[-1][0] if self.stack else ""
        return node


def _user_frame(e: BaseException) -> str:
    """`file:line: code` of the deepest frame outside torch: the line of the model's code that failed."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{Path('torch')}/" not in f.filename
              and not f.filename.endswith(("export/fold.py",))]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {Path(f.filename).name}:{f.lineno} `{(f.line or '').strip()}`"


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as an fx graph, or one line naming the module that cannot be traced and why."""
    tracer = _Tracer()
    tracer.root = model
    try:
        graph = tracer.trace(model)
    except Exception as e:
        path, module = tracer.failed_in or ("", model)
        where = f"{path or 'the model'} ({type(module).__name__})"
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "control flow" in text or "bool" in text:
            why = ("its forward branches or loops on a tensor's value (data-dependent control flow), which one "
                   "static ONNX graph cannot express")
            advice = "compute both branches and select with torch.where, or decide from constructor arguments"
        elif "iterated" in text:
            why = "it iterates over a traced value (a tuple whose length torch.fx cannot know)"
            advice = "index the pieces (t[:, a:b]) or unpack them into names"
        else:
            why, advice = f"{type(e).__name__}: {text}", "make its forward traceable by torch.fx"
        raise TraceError(f"cannot export {where}: {why}{_user_frame(e)}; {advice}.") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


_ATEN = re.compile(r"operator '?aten::([A-Za-z0-9_]+)'?")


def explain_export_error(gm: nn.Module, message: str) -> str | None:
    """For an ONNX exporter error about a missing aten op: the modules of the graph that call that op."""
    m = _ATEN.search(message)
    if m is None or not isinstance(gm, fx.GraphModule):
        return None
    op = m.group(1).rstrip("_")
    users = []
    for node in gm.graph.nodes:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if node.op in ("call_function", "call_method") and name.rstrip("_") == op:
            users.append(f"{node.meta.get('module_path') or 'the model'}")
    if not users:
        return None
    return f"the ONNX exporter has no aten::{op} (used in {', '.join(sorted(set(users)))})"


# --------------------------------------------------------------------------- graph helpers


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _channels(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return int(meta.shape[1]) if meta is not None and hasattr(meta, "shape") and len(meta.shape) > 1 else None


def _calls(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_cat(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim == 1 or (dim == -(_rank(node) or 0) + 1 and _rank(node) is not None)


class _Folder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.folds: Counter = Counter()
        self.serial = 0
        self.calls = _calls(gm)  # folds never add a call to an existing module, so this count stays right
        self.erased: set[fx.Node] = set()

    def replace(self, node: fx.Node, by: fx.Node) -> None:
        node.replace_all_uses_with(by)
        self.gm.graph.erase_node(node)
        self.erased.add(node)

    def affine(self, scale: Tensor, shift: Tensor, rank: int, dtype: torch.dtype) -> str:
        name = f"_folded_affine_{self.serial}"
        self.serial += 1
        self.gm.add_submodule(name, ChannelAffine(scale.to(dtype), shift.to(dtype), rank))
        return name

    def single_call(self, node: fx.Node) -> nn.Module | None:
        """The module a call_module node runs, if no other node runs it (folding it must not change another)."""
        module = _module(self.gm, node)
        return module if module is not None and self.calls.get(node.target, 1) == 1 else None

    # --- BatchNorm -> ChannelAffine; train-only layers out

    def lower(self) -> tuple[int, int]:
        bns = removed = 0
        for node in list(self.gm.graph.nodes):
            module = _module(self.gm, node)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and _rank(node):
                try:
                    scale, shift = _bn_affine64(module)
                except ValueError as e:
                    raise TraceError(f"cannot fold {node.target}: {e}") from e
                dtype = module.running_var.dtype  # type: ignore[union-attr]
                node.target = self.affine(scale, shift, _rank(node), dtype)  # type: ignore[arg-type]
                bns += 1
            elif isinstance(module, TRAIN_ONLY) or (node.op == "call_function" and node.target in TRAIN_ONLY_FUNCTIONS):
                self.replace(node, node.args[0])  # type: ignore[arg-type]
                removed += 1
            elif node.op == "call_function" and node.target in (operator.mul, torch.mul):
                self._constant_scale(node)
        return bns, removed

    def _constant_scale(self, node: fx.Node) -> None:
        """`x * p` with p a parameter or buffer of shape [C, 1, ...] (or [1, C, 1, ...]): a ChannelAffine."""
        x, p = node.args[0], node.args[1]
        if isinstance(x, fx.Node) and x.op == "get_attr":
            x, p = p, x
        if not (isinstance(p, fx.Node) and p.op == "get_attr" and isinstance(x, fx.Node)):
            return
        value = self.gm.get_parameter(p.target) if p.target in dict(self.gm.named_parameters()) else \
            self.gm.get_buffer(p.target)  # type: ignore[arg-type]
        rank, c = _rank(node), _channels(node)
        if rank is None or c is None or _channels(x) != c:
            return
        shape = list(value.shape)
        while len(shape) > rank - 1 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != rank - 1 or shape[0] != c or any(s != 1 for s in shape[1:]):
            return
        v = _f64(value).reshape(c)
        node.op, node.target, node.args, node.kwargs = "call_module", self.affine(v, torch.zeros_like(v), rank, value.dtype), (x,), {}
        self.folds["channel_scale"] += 1

    # --- the passes

    def run(self) -> None:
        changed = True
        while changed:
            changed = False
            for node in list(self.gm.graph.nodes):
                if node in self.erased or not isinstance(_module(self.gm, node), ChannelAffine):
                    continue
                changed |= (self._into_producer(node) or self._into_consumer(node) or self._through_cat(node)
                            or self._split_over_cat(node))
        for m in self.gm.modules():
            if isinstance(m, ChannelAffine):
                m.refresh()
        self.gm.graph.eliminate_dead_code()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()

    def _into_producer(self, node: fx.Node) -> bool:
        """conv/linear -> affine, affine -> affine: fold into the one before."""
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or _only_user(prev) is not node:
            return False
        aff, before = _module(self.gm, node), self.single_call(prev)
        scale, shift = _f64(aff.scale).flatten(), _f64(aff.shift).flatten()
        if isinstance(before, ChannelAffine):
            s0, t0 = _f64(before.scale).flatten(), _f64(before.shift).flatten()
            before.scale.copy_((s0 * scale).view_as(before.scale))
            before.shift.copy_((t0 * scale + shift).view_as(before.shift))
            kind = "affine_affine"
        elif isinstance(before, nn.Conv2d) or (isinstance(before, nn.Linear) and _rank(node) == 2):
            w = _f64(before.weight)
            b = _f64(before.bias) if before.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            w = w * scale.view(-1, *([1] * (w.dim() - 1)))
            self._set(before, w, b * scale + shift)
            kind = "conv_bn" if isinstance(before, nn.Conv2d) else "linear_bn"
        else:
            return False
        self.replace(node, prev)
        self.folds[kind] += 1
        return True

    @staticmethod
    def _set(layer: nn.Module, w: Tensor, b: Tensor) -> None:
        dtype = layer.weight.dtype
        layer.weight = nn.Parameter(w.to(dtype))
        layer.bias = nn.Parameter(b.to(dtype))

    def _fold_input(self, layer: nn.Module, scale: Tensor, shift: Tensor, start: int) -> bool:
        """Fold `s*x + t` on input channels [start, start+len(s)) into a conv without padding or a linear."""
        if isinstance(layer, nn.Conv2d):
            pad = layer.padding
            if any(pad) if not isinstance(pad, str) else pad != "valid" and any(k != 1 for k in layer.kernel_size):
                return False
            per_group = layer.in_channels // layer.groups
            out_per_group = layer.out_channels // layer.groups
            w = _f64(layer.weight).clone()
            b = _f64(layer.bias) if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            for i in range(scale.shape[0]):
                ch = start + i
                g, j = divmod(ch, per_group)
                rows = slice(g * out_per_group, (g + 1) * out_per_group)
                b = b.clone()
                b[rows] += w[rows, j].sum(dim=(1, 2)) * shift[i]
                w[rows, j] *= scale[i]
        elif isinstance(layer, nn.Linear):
            w = _f64(layer.weight).clone()
            b = _f64(layer.bias) if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            cols = slice(start, start + scale.shape[0])
            b = b + w[:, cols] @ shift
            w[:, cols] *= scale
        else:
            return False
        self._set(layer, w, b)
        return True

    def _into_consumer(self, node: fx.Node) -> bool:
        """affine -> conv without padding / linear: into its input columns."""
        user = _only_user(node)
        if user is None or user.args[0] is not node:
            return False
        layer = self.single_call(user)
        if isinstance(layer, nn.Linear) and _rank(node) != 2:
            return False
        aff = _module(self.gm, node)
        if layer is None or not self._fold_input(layer, _f64(aff.scale).flatten(), _f64(aff.shift).flatten(), 0):
            return False
        self.replace(node, node.args[0])  # type: ignore[arg-type]
        self.folds["bn_conv"] += 1
        return True

    def _through_cat(self, node: fx.Node) -> bool:
        """cat(..., affine(x), ...) -> 1x1 conv: into that slice of the conv's input columns."""
        cat = _only_user(node)
        if cat is None or not _is_cat(cat) or _rank(node) != 4:
            return False
        conv_node = _only_user(cat)
        if conv_node is None or conv_node.args[0] is not cat:
            return False
        layer = self.single_call(conv_node)
        inputs = list(cat.args[0])  # type: ignore[arg-type]
        if not isinstance(layer, nn.Conv2d) or inputs.count(node) != 1 or any(_channels(i) is None for i in inputs):
            return False
        start = sum(_channels(i) for i in inputs[: inputs.index(node)])  # type: ignore[misc]
        aff = _module(self.gm, node)
        if not self._fold_input(layer, _f64(aff.scale).flatten(), _f64(aff.shift).flatten(), start):
            return False
        self.replace(node, node.args[0])  # type: ignore[arg-type]
        self.folds["bn_cat_conv"] += 1
        return True

    def _split_over_cat(self, node: fx.Node) -> bool:
        """affine(cat(a, b, ...)): one affine per input, when one of them can then fold into its producer."""
        cat = node.args[0]
        if not isinstance(cat, fx.Node) or not _is_cat(cat) or _only_user(cat) is not node:
            return False
        inputs = list(cat.args[0])  # type: ignore[arg-type]
        widths = [_channels(i) for i in inputs]
        if any(w is None for w in widths) or len(set(inputs)) != len(inputs):
            return False
        foldable = [i for i in inputs if _only_user(i) is cat
                    and isinstance(self.single_call(i), (nn.Conv2d, ChannelAffine))]
        if not foldable:
            return False
        aff = _module(self.gm, node)
        scale, shift = _f64(aff.scale).flatten(), _f64(aff.shift).flatten()
        new_inputs, start = [], 0
        for i, w in zip(inputs, widths):
            with self.gm.graph.inserting_before(cat):
                name = self.affine(scale[start:start + w], shift[start:start + w], _rank(node), aff.scale.dtype)  # type: ignore[arg-type]
                piece = self.gm.graph.call_module(name, (i,))
            piece.meta["tensor_meta"] = i.meta.get("tensor_meta")
            new_inputs.append(piece)
            start += w  # type: ignore[operator]
        cat.args = (new_inputs,) + tuple(cat.args[1:])
        self.replace(node, cat)
        self.folds["bn_over_cat"] += 1
        return True


def _size_index(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(tensor, dim) when the node reads one dimension of a tensor's shape: x.size(d), x.size()[d], x.shape[d]."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
        return node.args[0], node.args[1]  # type: ignore[return-value]
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        src = node.args[0]
        if isinstance(src, fx.Node) and ((src.op == "call_method" and src.target == "size" and len(src.args) == 1)
                                         or (src.op == "call_function" and src.target is getattr
                                             and src.args[1] == "shape")):
            return src.args[0], node.args[1]  # type: ignore[return-value]
    return None


def specialize_sizes(gm: fx.GraphModule) -> int:
    """Every shape read but the batch's becomes a constant: the export is for one resolution, and ONNX wants
    constant pooling sizes and split lengths (coordinate attention's `adaptive_avg_pool2d(x, (h, 1))`)."""
    done = 0
    for node in list(gm.graph.nodes):
        found = _size_index(node)
        if found is None or not isinstance(found[0], fx.Node) or _rank(found[0]) is None:
            continue
        tensor, dim = found
        shape = tensor.meta["tensor_meta"].shape
        dim = dim % len(shape)
        if dim == 0:
            continue  # the batch stays dynamic
        value = int(shape[dim])
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
        gm.graph.erase_node(node)
        done += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return done


def fold_model(model: nn.Module, input_size: int) -> tuple[fx.GraphModule, FoldSummary]:
    """A folded, eval-mode graph copy of `model` for `input_size` px, and what was folded; `model` is untouched."""
    original = model
    model = copy.deepcopy(model).eval()
    gm = trace(model)
    ShapeProp(gm).propagate(torch.zeros(1, 3, input_size, input_size, dtype=_dtype(model)))
    specialize_sizes(gm)
    folder = _Folder(gm)
    with torch.no_grad():
        bns, removed = folder.lower()
        folder.run()
    left = sum(isinstance(m, ChannelAffine) for m in gm.modules())
    _require_finite_after_folding(gm)
    summary = FoldSummary(input_size, bns, dict(sorted(folder.folds.items())), left, removed,
                          sum(p.numel() for p in original.parameters()), sum(p.numel() for p in gm.parameters()))
    return gm.eval(), summary


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.float32


def deploy_form(model: nn.Module, input_size: int) -> tuple[nn.Module, Any]:
    """The deploy model and its fold summary: PartialNet's own exact folds, or the graph passes for anything else."""
    from partialnet.model import PartialNet

    from .reparam import reparameterize_model_with_summary

    if isinstance(model, PartialNet):
        return reparameterize_model_with_summary(model, input_size)
    return fold_model(model, input_size)
