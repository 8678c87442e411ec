"""manifest.json: what an export folder holds, and the metadata each artifact carries."""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from partialnet.errors import DeployError, UsageError
from partialnet.files import atomic_write_json, file_sha256

from .layout import MANIFEST, REFERENCE_ONNX

# 2: precision is only fp32/fp16/bf16/int8; how an int8 file is quantized (`scheme`) and the runtime it is meant
# for (`target`) are fields of their own. Version 1 folders are upgraded when loaded (`upgrade`).
FORMAT_VERSION = 2
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# How an int8 artifact is quantized.
SCHEMES = {
    "qdq": "QDQ for a CPU runtime: uint8 activations, per-channel int8 weights (onnxruntime.quantization)",
    "qdq-symmetric": "explicit Q/DQ, symmetric int8 with zero points 0 (TensorRT's explicit quantization)",
    "nncf": "NNCF post-training quantization (OpenVINO FakeQuantize)",
    "entropy": "TensorRT's implicit INT8 with its entropy calibrator",
}
# Schemes that are an alternative to a backend's main int8 artifact: their rows are keyed apart.
ALTERNATIVE_SCHEMES = ("entropy",)
# What version 1 wrote as a precision, and what it means now.
V1_PRECISIONS = {"int8-qdq": ("int8", "qdq-symmetric"), "int8-entropy": ("int8", "entropy")}
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
    """One file an export holds: the runtime that runs it here, its arithmetic, and what it is for."""

    backend: str  # the runtime that runs (and checks) it here
    precision: str  # fp32, fp16, bf16 or int8
    path: str  # relative to the export folder
    sha256: str
    bytes: int
    scheme: str | None = None  # int8 only: one of SCHEMES
    target: str | None = None  # the runtime it is meant for, when not `backend` (the TensorRT Q/DQ ONNX)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, folder: Path, rel: str, backend: str, precision: str, *, scheme: str | None = None,
           target: str | None = None, **extra: Any) -> "Artifact":
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if scheme is not None and scheme not in SCHEMES:
            raise ValueError(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
        path = folder / rel
        return cls(backend, precision, rel, file_sha256(path), path.stat().st_size, scheme,
                   None if target == backend else target, extra)

    @property
    def key(self) -> str:
        """Unique within a manifest: `openvino/int8`, `onnxruntime/int8@tensorrt`, `tensorrt/int8+entropy`."""
        key = f"{self.backend}/{self.precision}"
        if self.target:
            key += f"@{self.target}"
        if self.scheme in ALTERNATIVE_SCHEMES:
            key += f"+{self.scheme}"
        return key

    @property
    def precision_spec(self) -> str:
        """What `--precision` (and `Manifest.find`) takes to name this row: `int8`, `int8@tensorrt`, `int8+entropy`."""
        return self.key.split("/", 1)[1]

    @property
    def files(self) -> list[tuple[str, str | None]]:
        """(path, recorded sha256) of every file the artifact needs (an OpenVINO IR has its weights beside it)."""
        out = [(self.path, self.sha256)]
        if "weights" in self.extra:
            out.append((self.extra["weights"], self.extra.get("weights_sha256")))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {"backend": self.backend, "precision": self.precision, "path": self.path, "sha256": self.sha256,
             "bytes": self.bytes, "scheme": self.scheme, "target": self.target}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Artifact":
        known = {"backend", "precision", "path", "sha256", "bytes", "scheme", "target"}
        return cls(d["backend"], d["precision"], d["path"], d["sha256"], d.get("bytes", 0), d.get("scheme"),
                   d.get("target"), {k: v for k, v in d.items() if k not in known})


def parse_precision(text: str) -> tuple[str, str | None, str | None]:
    """`--precision` as (precision, target, scheme): `int8`, `int8@tensorrt`, `int8+entropy`, or a version 1
    name (`int8-qdq`: the symmetric Q/DQ ONNX, whatever its target; `int8-entropy`)."""
    if text in V1_PRECISIONS:
        precision, scheme = V1_PRECISIONS[text]
        return precision, None, scheme
    rest, _, scheme = text.partition("+")
    precision, _, target = rest.partition("@")
    if precision not in PRECISIONS or (scheme and scheme not in SCHEMES):
        raise UsageError(f"precision {text!r} is not one of {', '.join(PRECISIONS)} (optionally @TARGET or +SCHEME, "
                         f"e.g. int8@tensorrt, int8+entropy).")
    return precision, target or None, scheme or None


def upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A manifest dict of any earlier format version, as the current version (the input is not changed)."""
    d = json.loads(json.dumps(d))
    version = d.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise DeployError(f"the manifest has format version {version}, newer than this deploy reads "
                          f"({FORMAT_VERSION}); upgrade partialnet-deploy.")
    if version == 1:
        for a in d.get("artifacts", []):
            precision, scheme = V1_PRECISIONS.get(a["precision"], (a["precision"], None))
            if precision == "int8" and scheme is None:
                # Version 1 wrote the quantizer's facts into the row: NNCF's mode, or the Q/DQ node counts.
                scheme = "nncf" if "nncf_mode" in a else ("qdq-symmetric" if "source" in a else "qdq")
            a["precision"], a["scheme"] = precision, scheme
            a["target"] = a.pop("target_backend", None)
        for s in d.get("skipped", []):
            s["precision"] = V1_PRECISIONS.get(s["precision"], (s["precision"], None))[0]
        d["format_version"] = FORMAT_VERSION
    return d


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
        """The artifact `deploy predict --backend B --precision P` means; `precision` as `parse_precision` reads it.

        Without a precision, fp32. Among several rows of one backend and precision, the one meant for that backend
        (not the TensorRT Q/DQ ONNX that onnxruntime also runs) and not an alternative scheme.
        """
        want_precision, target, scheme = parse_precision(precision or "fp32")
        matches = [a for a in self.artifacts if a.backend == backend and a.precision == want_precision
                   and (a.target == target if target or not scheme else True)
                   and (a.scheme == scheme if scheme else a.scheme not in ALTERNATIVE_SCHEMES)]
        if not matches and precision is None:
            matches = [a for a in self.artifacts if a.backend == backend and a.target is None]
        if not matches:
            have = ", ".join(a.key for a in self.artifacts) or "none"
            want = backend + (f"/{precision}" if precision else "")
            skipped = [s for s in self.skipped if s["backend"] == backend]
            why = f" It was skipped at export: {skipped[0]['reason']}" if skipped else ""
            raise DeployError(f"the export has no {want} artifact (it has: {have}).{why}")
        return matches[0]

    def reference(self) -> Artifact:
        """The reparameterized FP32 ONNX every other artifact was built from."""
        for a in self.artifacts:
            if a.path == REFERENCE_ONNX:
                return a
        raise DeployError(f"the manifest lists no {REFERENCE_ONNX}; re-export with `deploy export --force`.")

    def skip(self, backend: str, precision: str, reason: str) -> None:
        self.skipped.append({"backend": backend, "precision": precision, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["artifacts"] = [a.to_dict() for a in self.artifacts]
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
            d = upgrade(d)
            arts = [Artifact.from_dict(a) for a in d.pop("artifacts")]
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
