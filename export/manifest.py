"""manifest.json: what an export folder holds, and the metadata each artifact carries."""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from partialnet.checkpoint import file_sha256
from partialnet.errors import DeployError

from partialnet.files import atomic_write_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOOL_PACKAGES = ("partialnet-deploy", "torch", "onnx", "onnxruntime", "onnxsim", "openvino", "nncf", "numpy", "tensorrt")


def tool_versions() -> dict[str, str]:
    """Installed versions of every library that shapes an artifact (without importing them)."""
    out = {"python": platform.python_version()}
    for name in TOOL_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class Artifact:
    backend: str
    precision: str
    path: str  # relative to the export folder
    sha256: str
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, folder: Path, rel: str, backend: str, precision: str, **extra: Any) -> "Artifact":
        path = folder / rel
        return cls(backend, precision, rel, file_sha256(path), path.stat().st_size, extra)


@dataclass
class Manifest:
    variant: str
    input_size: int
    num_classes: int
    preprocess: dict[str, Any]
    checkpoint_sha256: str | None
    source: dict[str, Any]
    architecture: dict[str, Any]
    artifacts: list[Artifact] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    tool_versions: dict[str, str] = field(default_factory=tool_versions)
    format_version: int = FORMAT_VERSION

    def find(self, backend: str, precision: str | None = None) -> Artifact:
        matches = [a for a in self.artifacts if a.backend == backend and (precision is None or a.precision == precision)]
        if not matches:
            have = ", ".join(f"{a.backend}/{a.precision}" for a in self.artifacts) or "none"
            want = backend + (f"/{precision}" if precision else "")
            skipped = [s for s in self.skipped if s["backend"] == backend]
            why = f" It was skipped at export: {skipped[0]['reason']}" if skipped else ""
            raise DeployError(f"the export has no {want} artifact (it has: {have}).{why}")
        if precision is None and len(matches) > 1:
            fp32 = [a for a in matches if a.precision == "fp32"]
            return fp32[0] if fp32 else matches[0]
        return matches[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for a in d["artifacts"]:
            extra = a.pop("extra")
            a.update(extra)
        return d

    def save(self, folder: Path) -> None:
        atomic_write_json(folder / MANIFEST, self.to_dict(), force=True)

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise DeployError(f"{folder} is not an export folder (no such directory); run 'deploy export' first.")
        if not path.is_file():
            raise DeployError(f"{folder} has no {MANIFEST}; it is not an export folder made by 'deploy export'.")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(d, dict):
                kind = {type(None): "null", list: "an array", str: "a string", bool: "a boolean"}.get(type(d), "a number")
                raise TypeError(f"it holds {kind}, not a JSON object")
            known = {"backend", "precision", "path", "sha256", "bytes"}
            arts = [Artifact(a["backend"], a["precision"], a["path"], a["sha256"], a.get("bytes", 0),
                             {k: v for k, v in a.items() if k not in known}) for a in d.pop("artifacts")]
            return cls(artifacts=arts, **d)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise DeployError(f"{path} is not a valid manifest ({type(e).__name__}: {e}); re-run 'deploy export --force'.") from e


def metadata_props(m: Manifest, precision: str) -> dict[str, str]:
    """The string pairs an ONNX artifact carries in metadata_props."""
    return {
        "partialnet.variant": m.variant,
        "partialnet.input_size": str(m.input_size),
        "partialnet.num_classes": str(m.num_classes),
        "partialnet.precision": precision,
        "partialnet.preprocess": json.dumps(m.preprocess, sort_keys=True),
        "partialnet.checkpoint_sha256": m.checkpoint_sha256 or "none (freshly initialised)",
        "partialnet.architecture": json.dumps(m.architecture, sort_keys=True),
        "partialnet.tool_versions": json.dumps(m.tool_versions, sort_keys=True),
    }


def digest(*parts: bytes | str) -> str:
    """A short stable hash of several inputs (cache keys)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()
