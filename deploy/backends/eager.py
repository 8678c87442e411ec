"""The PyTorch model itself: the reference every artifact is compared with. It has no artifact of its own."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from export.manifest import Artifact
from partialnet.errors import DeployError
from runtimes.base import Runner

from .base import BuildContext, Int8Inputs, RunnerOptions

if TYPE_CHECKING:
    import torch


class Eager:
    name = "eager"
    makes_artifacts = False
    float_precisions: tuple[str, ...] = ()
    runs_reference_onnx = False
    builds_offline = False

    def status(self) -> str | None:
        return None

    def build(self, ctx: BuildContext, precision: str) -> Artifact:
        raise DeployError("eager runs the PyTorch model itself and builds no artifact.")

    def build_int8(self, ctx: BuildContext, q: Int8Inputs) -> list[tuple[Artifact, dict]]:
        raise DeployError("eager runs the PyTorch model itself and builds no artifact.")

    def prepare_offline(self, ctx: BuildContext, precisions: list[str]) -> None:
        return None

    def triton_model(self, art: Artifact) -> None:
        return None

    def open(self, path: Path, precision: str, options: RunnerOptions) -> Runner:
        raise DeployError("eager runs a model, not a file: use open_model.")

    def open_streams(self, path: Path, precision: str, options: RunnerOptions, streams: int | None):
        raise DeployError("eager runs a model, not a file: use open_model_streams.")

    def open_model_streams(self, model: "torch.nn.Module", input_size: int | None, options: RunnerOptions,
                           streams: int | None):
        """Batched calls, one after another, on all of torch's threads: what eager serving does."""
        from runtimes.throughput import ThreadedStreams

        runner = self.open_model(model, input_size, options)
        return ThreadedStreams([runner.run], dict(runner.options), runner.close)

    def open_model(self, model: "torch.nn.Module", input_size: int | None, options: RunnerOptions) -> Runner:
        from runtimes.eager import EagerRunner

        return EagerRunner(model, input_size, threads=options.threads)
