"""Error types shared by every layer; each carries the exit code the CLI returns for it."""
from __future__ import annotations


class DeployError(Exception):
    """A failure the user can act on: the message says what went wrong and what to do."""

    exit_code = 1


class UsageError(DeployError):
    """The command line asked for something that cannot be done as stated."""

    exit_code = 2


class CheckpointError(DeployError):
    """A checkpoint could not be read or does not match the architecture."""


class ImageError(DeployError):
    """An input image could not be read or decoded."""


class WriteError(DeployError):
    """A file could not be written (full disk, no permission): the run stops; no backend is skipped over it."""
