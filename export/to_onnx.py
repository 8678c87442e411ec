"""ONNX export of a PartialNet (usually its reparameterized form) with a fixed resolution and dynamic batch.

The resolution is fixed per export because the attention bias depends on it (spec §8.1); the batch axis is
dynamic. The file is self-contained (weights inside) and written atomically.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

from partialnet.errors import DeployError, UsageError
from runtimes.base import INPUT_NAME, OUTPUT_NAME

from partialnet.files import atomic_path

Exporter = Literal["torchscript", "dynamo"]
DEFAULT_OPSET = 18
BATCH_DIM = "batch"


class ExportError(DeployError):
    """The model could not be converted or the converted graph is invalid."""


# The lowest opset each exporter emits (the dynamo exporter builds on opset 18 onnxscript functions).
MIN_OPSET = {"torchscript": 7, "dynamo": 18}


def supported_opsets(exporter: str) -> tuple[int, int]:
    """(lowest, highest) ONNX opset this torch's `exporter` writes and this onnx library can check."""
    from torch.onnx import _constants  # the exporters' own bounds; private, so read defensively

    hi = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None) if exporter == "torchscript" else None
    hi = hi or getattr(_constants, "ONNX_MAX_OPSET", DEFAULT_OPSET)
    return MIN_OPSET.get(exporter, 7), min(int(hi), onnx.defs.onnx_opset_version())


def check_opset(opset: int, exporter: str) -> None:
    """Refuse, before any work, an opset the exporter cannot write."""
    lo, hi = supported_opsets(exporter)
    if not lo <= opset <= hi:
        raise UsageError(f"--opset {opset} is outside what the {exporter} exporter writes here ({lo} to {hi}); "
                          f"pass one in that range (default {DEFAULT_OPSET}).")


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 as well as sys.stdout: the exporters' C++ code prints graphs straight to it, and
    stdout carries only the command's result."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass
class GraphStats:
    nodes: int
    ops: dict[str, int]
    initializers: int
    parameters: int

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphStats":
        ops = Counter(n.op_type for n in model.graph.node)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        return cls(len(model.graph.node), dict(sorted(ops.items())), len(model.graph.initializer), params)


def export_onnx(
    model: torch.nn.Module,
    dest: str | Path,
    input_size: int,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "torchscript",
    force: bool = False,
) -> onnx.ModelProto:
    """Export `model` to one self-contained .onnx with input 'input' [batch, 3, N, N] and output 'logits'."""
    check_opset(opset, exporter)
    model = model.eval()
    example = torch.zeros(2, 3, input_size, input_size)
    with atomic_path(dest, force=force) as tmp:
        try:
            with warnings.catch_warnings(), _quiet_stdout():
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    batch = torch.export.Dim(BATCH_DIM, min=1, max=4096)
                    torch.onnx.export(
                        model, (example,), str(tmp), dynamo=True, opset_version=opset, external_data=False,
                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                        verbose=False,
                    )
                else:
                    torch.onnx.export(
                        model, (example,), str(tmp), dynamo=False, opset_version=opset,
                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                        dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                        do_constant_folding=True,
                    )
        except Exception as e:
            raise ExportError(f"the {exporter} ONNX exporter failed at opset {opset}: {type(e).__name__}: "
                              f"{_first_line(e)}") from e
        proto = onnx.load(str(tmp))
        _name_batch_axis(proto)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the exported graph fails onnx.checker: {_first_line(e)}") from e
        onnx.save(proto, str(tmp))
    return proto


def _name_batch_axis(proto: onnx.ModelProto) -> None:
    """Give the graph input and output the same symbolic batch dimension, whatever the exporter called it."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = BATCH_DIM


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace the model's metadata_props with these string pairs."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def save_onnx(proto: onnx.ModelProto, dest: str | Path, *, force: bool = False) -> None:
    with atomic_path(dest, force=force) as tmp:
        onnx.save(proto, str(tmp))
