"""What a backend is: the one protocol every runtime implements, and what it is given to build and open.

Polygraphy keeps a loader (builds or reads an artifact) apart from a runner (executes it); here a `Backend` is
both halves for one runtime: whether it can run here, building its FP32 and INT8 artifacts into an export folder,
and opening a runner for one of them. Pipeline, validate, bench and predict only iterate the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from export.layout import REFERENCE_ONNX
from export.manifest import Artifact, Manifest
from partialnet.console import Console
from runtimes.base import Runner

if TYPE_CHECKING:
    from runtimes.throughput import Streams

if TYPE_CHECKING:
    from calibration.ort_int8 import QuantSession
    from calibration.policy import FloatPolicy
    from calibration.sources import ImageSet


def import_status(module: str, label: str) -> str | None:
    """None when `module` imports here, else the one-line reason (a runtime's native library can fail to load)."""
    import importlib

    from runtimes.artifacts import one_line

    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or OSError/RuntimeError from a broken native library
        return f"{label} failed to import ({one_line(e)}); reinstall it with `pip install -e .`."
    return None


@dataclass(frozen=True)
class RunnerOptions:
    """How to open a runner: CPU threads (None: the library's default)."""

    threads: int | None = None


@dataclass
class BuildContext:
    """An export folder being built: where, its manifest so far, and where notes go."""

    folder: Path
    manifest: Manifest
    console: Console
    threads: int | None = None
    force: bool = False

    @property
    def onnx(self) -> Path:
        return self.folder / REFERENCE_ONNX

    def artifact(self, rel: str, backend: str, precision: str, **fields: Any) -> Artifact:
        """Record a file the backend wrote (hash and size read from disk) in the manifest, and return its row."""
        art = Artifact.of(self.folder, rel, backend, precision, **fields)
        self.manifest.artifacts.append(art)
        return art


@dataclass
class Int8Inputs:
    """What every backend's INT8 build shares: one calibration, one float policy, the same metadata."""

    calib: "ImageSet"
    val: "ImageSet | None"
    session: "QuantSession"
    policy: "FloatPolicy"
    metadata: dict[str, str]
    max_accuracy_drop: float | None = None  # fraction; OpenVINO's accuracy-controlled mode
    int8_cpu: str = "auto"  # which CPUs OpenVINO's int8 weights must be exact on
    ov_model_type: str = "cnn"
    row: dict[str, Any] = field(default_factory=dict)  # the manifest facts every int8 row carries


@dataclass(frozen=True)
class TritonModel:
    """How NVIDIA's Triton (the official container) runs an artifact natively: its platform or backend, the files
    of the version folder ({name in 1/: path in the export}), and the config's extras."""

    files: dict[str, str]
    platform: str | None = None  # "onnxruntime_onnx", "tensorrt_plan"
    backend: str | None = None  # "openvino"
    kind: str = "KIND_CPU"
    default_model_filename: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    max_batch: int | None = None  # a cap below the requested one (a TensorRT engine's profile)


@runtime_checkable
class Backend(Protocol):
    name: str  # "openvino"
    makes_artifacts: bool  # False for eager: it runs the model itself
    float_precisions: tuple[str, ...]  # what `build` makes from the FP32 ONNX
    runs_reference_onnx: bool  # the runtime that runs (and checks) the reference model.onnx itself
    builds_offline: bool  # `build_int8` and `prepare_offline` make useful files even where it cannot run

    def status(self) -> str | None:
        """None when it can run here, else the one-line reason it cannot."""

    def build(self, ctx: BuildContext, precision: str) -> Artifact:
        """Build the artifact of one float precision from ctx.onnx and record it; DeployError to skip it."""

    def build_int8(self, ctx: BuildContext, q: Int8Inputs) -> list[tuple[Artifact, dict[str, Any]]]:
        """Build and record this backend's INT8 artifact(s), each with what its quantizer did (for the report);
        DeployError to skip the backend's INT8. The caller checks every artifact against eager."""

    def prepare_offline(self, ctx: BuildContext, precisions: list[str]) -> None:
        """It cannot run here: write what the target machine needs to build it there (or nothing)."""

    def open(self, path: Path, precision: str, options: RunnerOptions) -> Runner:
        """A runner for the file at `path`, which holds an artifact of `precision` (one request at a time, as a
        latency-bound deployment runs it)."""

    def triton_model(self, art: Artifact) -> TritonModel | None:
        """The Triton-native model for one of its artifacts, or None when Triton has no backend for it."""

    def open_streams(self, path: Path, precision: str, options: RunnerOptions, streams: int | None) -> "Streams":
        """Many requests in flight, the way this runtime serves a throughput-bound deployment; `streams` None
        lets the runtime choose."""
