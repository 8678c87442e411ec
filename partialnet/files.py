"""Atomic writes for every layer: a temporary file in the same folder, then a rename, so an interrupted run never
leaves a half-written file that looks complete. An existing file is kept unless `force`."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import DeployError, UsageError, WriteError


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
    if dest.is_dir():
        raise UsageError(f"{dest} is a folder; name a file to write.")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        raise write_error(dest, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # mkstemp creates 0600; the result should look like any other file
        os.replace(tmp_path, dest)
    except OSError as e:
        raise write_error(dest, e) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_error(dest: Path, e: OSError) -> WriteError:
    """One line for a failed write: what could not be written, why, and (for a full disk) how much space is left."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(f"cannot write {dest}: no space left on the device ({free_space(dest)} free there); "
                           f"free some space and run again. Nothing half-written was kept.")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(f"cannot write {dest}: {e.strerror.lower() if e.strerror else 'not permitted'}; "
                           f"choose a writable location.")
    return WriteError(f"cannot write {dest}: {e.strerror or e}.")


def os_error(e: OSError) -> DeployError | None:
    """A one-line DeployError for an OSError whose cause the user can act on (space, permissions); else None."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
        return None
    return write_error(Path(e.filename) if e.filename else Path("."), e)


def free_space(path: str | Path) -> str:
    """Free space on the file system holding `path` (or its nearest existing parent), e.g. '1.2 GB'."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return human_bytes(shutil.disk_usage(p).free)
    except OSError:
        return "unknown"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# Leading bytes of formats people pass by mistake where a checkpoint or an array is expected.
_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image or WAV audio)"),
    (b"BM", "a BMP image"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an executable"),
    (b"<?xml", "an XML file (an OpenVINO IR .xml?)"),
)


def sniff_format(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when they say something; None otherwise."""
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if head[:1] == b"\x08" and len(head) > 2:
        return "a protobuf file (an ONNX model?)"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return None


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or Inf float replaced by None, so the JSON it becomes is valid (RFC 8259 has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def json_text(obj: Any) -> str:
    """Strict JSON text of `obj`: non-finite numbers become null."""
    return json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False)


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
    atomic_write_text(dest, json_text(obj) + "\n", force=force)
