"""An export as validate, bench and predict use it: its folder, manifest and eager model, and runners for its rows.

`deploy export` hands over what it already holds (`ExportHandle` with the model in memory); the folder-level
commands open one from disk (`open_export`). Either way the same functions run on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from export.manifest import Artifact, Manifest
from partialnet.console import Console
from partialnet.errors import DeployError, UsageError
from runtimes.base import BackendUnavailable, Runner

from . import backends
from .backends import EAGER, RunnerOptions

if TYPE_CHECKING:
    import torch


@dataclass
class ExportHandle:
    folder: Path  # where the files are now (a staging folder during export)
    manifest: Manifest
    model: "torch.nn.Module"  # the eager model the export was made from
    shown_as: Path  # the folder's name in reports: its final place

    def eager_runner(self, options: RunnerOptions) -> "Opened":
        return Opened(EAGER.name, EAGER.open_model(self.model, self.manifest.input_size, options))


def require_export_memory(manifest: Manifest, batch: int, what: str) -> None:
    """Refuse, before the model is built, a batch whose forward pass would not fit in memory (partialnet.resources)."""
    from partialnet.resources import config_from_dict, require_memory

    if manifest.architecture.get("kind") == "factory":
        return  # no architecture table to estimate from: the first forward pass is the check
    require_memory(config_from_dict(manifest.architecture), manifest.input_size, batch, what)


def open_export(folder: str | Path, *, manifest: Manifest | None = None, allow_pickle: bool = False,
                console: Console | None = None) -> ExportHandle:
    """An export folder from disk (its manifest read here unless given), with its eager model rebuilt (and its
    checkpoint hash-checked)."""
    from .reference import eager_from_manifest

    folder = Path(folder)
    manifest = manifest if manifest is not None else Manifest.load(folder)
    model = eager_from_manifest(manifest, allow_pickle=allow_pickle, log=console)
    return ExportHandle(folder, manifest, model, folder)


@dataclass
class Opened:
    """A runner ready to call, with the manifest row it runs (None for the eager reference)."""

    key: str
    runner: Runner
    artifact: Artifact | None = None

    @property
    def backend(self) -> str:
        return self.artifact.backend if self.artifact else EAGER.name

    @property
    def precision(self) -> str:
        return self.artifact.precision if self.artifact else "fp32"

    @property
    def runner_threads(self) -> int | None:
        """The threads the runner computes with, as it reports them (None: the library's default)."""
        return getattr(self.runner, "options", {}).get("threads")


def select_rows(manifest: Manifest, wanted: str | None) -> list[Artifact]:
    """The manifest's artifacts for the named backends (comma-separated; None = all). Eager always runs anyway."""
    if wanted is None:
        return list(manifest.artifacts)
    names = [b.strip() for b in wanted.split(",") if b.strip() and b.strip() != EAGER.name]
    known = backends.names()
    unknown = [b for b in names if b not in known]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}; choose from {EAGER.name}, {', '.join(known)}.")
    for b in names:
        manifest.find(b)  # raises, naming what the export has, when there is no such artifact
    return [a for a in manifest.artifacts if a.backend in names]


def open_rows(folder: Path, rows: Sequence[Artifact], options: RunnerOptions,
              console: Console) -> tuple[list[Opened], list[dict[str, str]]]:
    """Runners for the rows (hash-checked); a row whose backend cannot run here is skipped with the reason."""
    opened: list[Opened] = []
    skipped: list[dict[str, str]] = []
    try:
        for art in rows:
            try:
                runner = backends.open_row(folder, art, options)
            except BackendUnavailable as e:
                skipped.append({"backend": art.backend, "precision": art.precision, "key": art.key, "reason": str(e)})
                console(f"skipped {art.key}: {e}")
                continue
            opened.append(Opened(art.key, runner, art))
    except BaseException:
        close_all(opened)
        raise
    return opened, skipped


def close_all(opened: Sequence[Opened]) -> None:
    for o in opened:
        o.runner.close()


def nothing_runs_error(rows: Sequence[Artifact], skipped: Sequence[dict[str, str]]) -> DeployError:
    reasons = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped)
    return DeployError(f"none of the {len(rows)} requested artifact(s) can run here ({reasons}); "
                       f"run on a machine with that backend, or pick others with --backends.")
