"""Runners as a user runs each runtime by hand, and side-by-side timing of them with `deploy bench`'s method.

The benchmark scripts compare graphs that are not export folders (rewrites, a generic pipeline), so they open
these plain runners instead of the project's: OpenVINO compiled as `benchmark_app -hint latency -b 1
-infer_precision f32` compiles it (a static shape), ONNX Runtime with default session options, and the eager
model in inference mode. `time_side_by_side` puts each in its own worker process (`deploy.timing`) and
round-robins slices between them, so machine drift falls on every runner alike.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class StaticOpenVINO:
    """An IR compiled as benchmark_app -hint latency compiles it: static shape, f32, LATENCY, N threads."""

    def __init__(self, xml: str, batch: int, threads: int):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(xml)
        shape = list(model.inputs[0].get_partial_shape().get_min_shape())
        shape[0] = batch
        model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(shape)})
        self._compiled = core.compile_model(model, "CPU", {
            ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY,
            ov.properties.hint.inference_precision: ov.Type.f32,
            ov.properties.inference_num_threads: threads,
        })
        self._request = self._compiled.create_infer_request()
        self.name = f"openvino:{Path(xml).stem}"
        self.options = {"threads": threads}

    def run(self, feeds):
        return {"logits": np.array(self._request.infer({0: feeds["input"]})[self._compiled.outputs[0]])}

    def close(self):
        self._request = self._compiled = None


class PlainOnnxRuntime:
    """ONNX Runtime as a user runs it: default options (spinning on), N intra-op threads."""

    def __init__(self, path: str, threads: int):
        import onnxruntime as ort

        from runtimes.cpu import int8_dot_saturates
        from runtimes.ort import EXACT_INT8_KEY

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        if int8_dot_saturates():
            so.add_session_config_entry(EXACT_INT8_KEY, "1")
        self._sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.name = f"onnxruntime:{Path(path).stem}"
        self.options = {"threads": threads}

    def run(self, feeds):
        return {"logits": self._sess.run(None, {"input": feeds["input"]})[0]}

    def close(self):
        self._sess = None


def open_static_openvino(xml: str, threads: int) -> StaticOpenVINO:
    return StaticOpenVINO(xml, 1, threads)


def open_plain_onnxruntime(path: str, threads: int) -> PlainOnnxRuntime:
    return PlainOnnxRuntime(path, threads)


class PlainEager:
    """The eager model as the issue's check runs it: torch with N threads, inference mode."""

    def __init__(self, model, threads: int):
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        self._model = model.eval()
        self.name = "eager"
        self.options = {"threads": threads}

    def run(self, feeds):
        with self._torch.inference_mode():
            return {"logits": self._model(self._torch.from_numpy(feeds["input"])).numpy()}

    def close(self):
        self._model = None


def open_plain_eager(variant: str, threads: int) -> PlainEager:
    import partialnet

    return PlainEager(partialnet.build_model(variant).model, threads)


def time_side_by_side(factories: Mapping[str, Callable[[], object]], size: int, threads: int, duration_s: float,
                      slice_s: float, batch: int = 1) -> dict[str, list[float]]:
    """Per-call times (s) of every runner, each in its own process, interleaved one slice at a time."""
    from deploy.backends import RunnerOptions
    from deploy.timing import WorkerSpec, close_workers, open_workers, round_robin, send_inputs

    specs = [WorkerSpec(key, RunnerOptions(threads=threads), factory=f) for key, f in factories.items()]
    workers = open_workers(specs)
    try:
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        send_inputs(workers, {batch: x})
        timed = round_robin(workers, [batch], mode="latency", warmup_s=1.0, duration_s=duration_s,
                            slice_s=slice_s, min_calls=20)
    finally:
        close_workers(workers)
    return {key: t.times_s for (key, _), t in timed.items()}


def median_ms(times_s: list[float]) -> float:
    return statistics.median(times_s) * 1e3
