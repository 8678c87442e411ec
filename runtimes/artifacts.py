"""Checks that an artifact on disk is present, whole, and the one its manifest describes."""
from __future__ import annotations

from pathlib import Path

from partialnet.files import file_sha256
from partialnet.errors import DeployError

REEXPORT_HINT = "re-export it with `deploy export --force`"


class ArtifactError(DeployError):
    """An exported artifact is missing, unreadable, truncated or not the one the manifest names."""


def require_file(path: str | Path, what: str = "artifact") -> Path:
    """Return `path` as a Path, or raise ArtifactError naming it if it is not an existing file."""
    path = Path(path)
    if not path.is_file():
        seen = "is a directory" if path.is_dir() else "does not exist"
        raise ArtifactError(f"{what} {path} {seen}; check the path or {REEXPORT_HINT}.")
    return path


def check_artifact(path: str | Path, expected_sha256: str | None) -> Path:
    """Raise ArtifactError if the file is missing or its SHA-256 differs from the manifest's (when one is given)."""
    path = require_file(path)
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual.lower() != expected_sha256.strip().lower():
            raise ArtifactError(
                f"{path} has sha256 {actual} but its manifest records {expected_sha256.strip()}: the file was changed, "
                f"truncated or replaced after export; {REEXPORT_HINT}."
            )
    return path


def load_failure(path: str | Path, library: str, error: BaseException) -> ArtifactError:
    """An ArtifactError for a file a backend could not parse, with the library's reason on one line."""
    return ArtifactError(
        f"{library} could not load {path} ({one_line(error)}); the file may be truncated or corrupt, {REEXPORT_HINT}."
    )


def one_line(error: BaseException, limit: int = 240) -> str:
    """The most telling line of a backend's (often multi-line) error text, shortened to `limit` characters."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    # OpenVINO prefixes the reason with "Exception from src/...:" and "Check '...' failed at ..." lines.
    telling = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))] or lines
    text = telling[-1] if telling else type(error).__name__
    text = text.rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."
