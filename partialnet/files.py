"""Atomic writes for every layer: a temporary file in the same folder, then a rename, so an interrupted run never
leaves a half-written file that looks complete. An existing file is kept unless `force`."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import UsageError


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()
EXEC_MODE = DIR_MODE  # rwx as the umask allows: for generated scripts


@contextmanager
def atomic_path(dest: str | Path, *, force: bool = False, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success rename it onto `dest`, on failure delete it."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise UsageError(f"{dest} exists; pass --force to overwrite it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # mkstemp creates 0600; the result should look like any other file
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(dest: str | Path, data: bytes | memoryview, *, force: bool = False, mode: int = FILE_MODE) -> Path:
    with atomic_path(dest, force=force, mode=mode) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def atomic_save_npy(dest: str | Path, arr: np.ndarray, *, force: bool = False) -> None:
    with atomic_path(dest, force=force) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def atomic_write_text(dest: str | Path, text: str, *, force: bool = False) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"), force=force)


def atomic_write_json(dest: str | Path, obj: Any, *, force: bool = False) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n", force=force)
