"""The backend registry: the only place that knows which runtimes exist.

A backend is a module in this package implementing `Backend` (base.py) and one `register` line below. Pipeline,
validate, bench and predict iterate `BACKENDS`; nothing outside a backend's module branches on its name.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from export.manifest import Artifact, Manifest
from partialnet.errors import UsageError
from runtimes.artifacts import check_artifact
from runtimes.base import BackendUnavailable, Runner

from .base import Backend, BuildContext, Int8Inputs, RunnerOptions, TritonModel
from .eager import Eager
from .ort import OnnxRuntime
from .ov import OpenVINO
from .trt import TensorRT

BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend (a later one with the same name replaces it); returns it."""
    BACKENDS[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    BACKENDS.pop(name, None)


EAGER = register(Eager())
register(OnnxRuntime())
register(OpenVINO())
register(TensorRT())


def artifact_backends() -> list[Backend]:
    """The backends that build artifacts, in registration order."""
    return [b for b in BACKENDS.values() if b.makes_artifacts]


def names() -> list[str]:
    return [b.name for b in artifact_backends()]


def get(name: str) -> Backend:
    """The backend called `name`, or a UsageError naming the closest one and all of them."""
    if name in BACKENDS:
        return BACKENDS[name]
    close = difflib.get_close_matches(name.lower(), list(BACKENDS), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"unknown backend {name!r}{hint}; backends are {', '.join(BACKENDS)}.")


def reference_backend() -> Backend:
    """The backend that runs the reference model.onnx (and whose run of it is the post-export check)."""
    return next(b for b in artifact_backends() if b.runs_reference_onnx)


def status() -> dict[str, str | None]:
    """For each artifact backend, None if it can run here, else the one-line reason it cannot."""
    return {b.name: b.status() for b in artifact_backends()}


def parse_backends(text: str | None) -> tuple[list[Backend], dict[str, str]]:
    """The backends to build (default: every one usable here), and why each requested one cannot run here."""
    if text is None:
        return [b for b in artifact_backends() if b.status() is None], {}
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    known = names()
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(known)}.")
    usable, unavailable = [], {}
    for w in dict.fromkeys(wanted):
        reason = BACKENDS[w].status()
        if reason is None:
            usable.append(BACKENDS[w])
        else:
            unavailable[w] = reason
    return usable, unavailable


def open_row(folder: Path, art: Artifact, options: RunnerOptions = RunnerOptions()) -> Runner:
    """A runner for one manifest row, after checking its backend can run here and its files' hashes."""
    if art.backend not in BACKENDS:
        raise BackendUnavailable(f"this deploy has no runner for backend {art.backend!r} (it runs "
                                 f"{', '.join(names())})")
    backend = BACKENDS[art.backend]
    reason = backend.status()
    if reason is not None:
        raise BackendUnavailable(reason)
    for rel, sha in art.files:
        check_artifact(folder / rel, sha)
    return backend.open(folder / art.path, art.precision, options)


def open_row_streams(folder: Path, art: Artifact, options: RunnerOptions, streams: int | None):
    """The throughput counterpart of `open_row` (runtimes.throughput.Streams), after the same checks."""
    backend = BACKENDS.get(art.backend)
    if backend is None or backend.status() is not None:
        open_row(folder, art, options).close()  # raises the reason, worded as for latency
    for rel, sha in art.files:
        check_artifact(folder / rel, sha)
    return BACKENDS[art.backend].open_streams(folder / art.path, art.precision, options, streams)


def open_artifact(folder: Path, manifest: Manifest, backend: str, precision: str | None,
                  threads: int | None = None, **options: Any) -> tuple[Runner, Artifact]:
    """A runner for the manifest's (backend, precision) artifact (`Manifest.find`), hash-checked."""
    reason = get(backend).status()
    if reason is not None:
        raise BackendUnavailable(reason)
    art = manifest.find(backend, precision)
    return open_row(Path(folder), art, RunnerOptions(threads=threads, **options)), art


__all__ = ["BACKENDS", "EAGER", "Backend", "BuildContext", "Int8Inputs", "RunnerOptions", "artifact_backends",
           "get", "names", "open_artifact", "open_row", "open_row_streams", "parse_backends", "reference_backend", "register",
           "status", "TritonModel", "unregister"]
