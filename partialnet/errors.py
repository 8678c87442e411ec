"""Error types shared by every layer; each carries the exit status the CLI returns for it."""
from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """What `deploy` returns: the README documents these numbers, and tests and scripts rely on them."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    GATE_FAILED = 3  # a validation gate failed: the artifacts exist, but do not meet a tolerance
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


def first_line(e: BaseException) -> str:
    """An exception as one line for a message: its type and the first line of its text."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class DeployError(Exception):
    """A failure the user can act on: the message says what went wrong and what to do."""

    exit_code: ExitStatus = ExitStatus.FAILURE


class UsageError(DeployError):
    """The command line asked for something that cannot be done as stated."""

    exit_code = ExitStatus.USAGE


class CheckpointError(DeployError):
    """A checkpoint could not be read or does not match the architecture."""


class ImageError(DeployError):
    """An input image could not be read or decoded."""


class WriteError(DeployError):
    """A file could not be written (full disk, no permission): the run stops; no backend is skipped over it."""
