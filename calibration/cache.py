"""Calibration caches that are never reused stale.

Every cache (TensorRT's calibration cache, onnxruntime's calibration ranges) is keyed by the hash of the model
file's bytes, of the calibration set (its array bytes and where it came from) and of the preprocessing, plus
whatever else shaped it (method, calibrated op types, tool version). The key is written beside the cache as
`<cache>.key.json`, after the cache itself: a cache without a matching key file is stale or half-written, and is
deleted rather than read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from partialnet.files import file_sha256
from partialnet.files import atomic_write_bytes

from .sources import ImageSet

KEY_SUFFIX = ".key.json"


def array_sha256(images: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (C order)."""
    h = hashlib.sha256()
    h.update(f"{images.dtype.str}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def calibration_sha256(calib: ImageSet) -> str:
    """One hash of a calibration set's images and its source sentence."""
    h = hashlib.sha256()
    h.update(array_sha256(calib.images).encode())
    h.update(b"\0")
    h.update(calib.source.encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What a cached calibration result depends on; two keys are equal only if every field is."""

    model_sha256: str
    calibration_sha256: str
    calibration_source: str
    calibration_size: int
    preprocess: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model_path: str | Path, calib: ImageSet, preprocess: Mapping[str, Any], **extra: Any) -> "CacheKey":
        return cls(file_sha256(model_path), calibration_sha256(calib), calib.source, len(calib), dict(preprocess),
                   dict(extra))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = dict(self.preprocess)
        d["extra"] = dict(self.extra)
        return d

    def digest(self) -> str:
        """A stable hash of the whole key (JSON with sorted keys)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


class KeyedCache:
    """A cache file with its key beside it; `valid()` only when the stored key equals this one."""

    def __init__(self, path: str | Path, key: CacheKey):
        self.path = Path(path)
        self.key = key
        self.key_path = self.path.with_name(self.path.name + KEY_SUFFIX)

    def stored_key(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.key_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def valid(self) -> bool:
        stored = self.stored_key()
        return self.path.is_file() and stored is not None and stored.get("digest") == self.key.digest()

    def status(self) -> str:
        """'hit', 'miss' (nothing cached) or 'stale' (cached for another model, calibration set or setting)."""
        if self.valid():
            return "hit"
        return "stale" if self.path.exists() or self.key_path.exists() else "miss"

    def clear(self) -> None:
        """Delete the cache and its key (a stale cache is removed before anything could read it)."""
        for p in (self.key_path, self.path):
            if p.exists():
                p.unlink()

    def prepare(self) -> str:
        """Make the cache path safe to hand to a tool that reads it if present: drop it unless valid."""
        status = self.status()
        if status == "stale":
            self.clear()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return status

    def read_bytes(self) -> bytes | None:
        """The cached bytes if the key matches; None (after deleting a stale cache) otherwise."""
        if self.prepare() != "hit":
            return None
        return self.path.read_bytes()

    def write_bytes(self, data: bytes) -> None:
        """Write the cache atomically, then its key."""
        atomic_write_bytes(self.path, data, force=True)
        self.commit()

    def commit(self) -> None:
        """Record the key for a cache file a tool has just written at `path`."""
        if not self.path.is_file():
            raise FileNotFoundError(f"no cache file at {self.path} to record a key for")
        payload = {"digest": self.key.digest(), "key": self.key.to_dict()}
        atomic_write_bytes(self.key_path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode(),
                           force=True)
