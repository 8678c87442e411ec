"""`deploy triton`: a Triton model repository for an export folder.

One model per artifact, for NVIDIA's official Triton container (which has the onnxruntime, OpenVINO and TensorRT
backends; PyTriton's bundled server has only the Python backend):

    REPO/<name>_onnxruntime_fp32/config.pbtxt   platform: "onnxruntime_onnx", 1/model.onnx
    REPO/<name>_openvino_int8/config.pbtxt      backend: "openvino", 1/model.xml + 1/model.bin, precision hint
    REPO/<name>_tensorrt_fp16/config.pbtxt      platform: "tensorrt_plan", 1/model.plan (only if the export built one)

and the two Python-backend models `deploy serve` runs, `<name>` and `<name>_image`, which run any artifact through
this project's runner (deploy/serving/python_model.py) and so also serve with PyTriton's server.

config.pbtxt is protobuf text of Triton's ModelConfig, written here without protobuf so `deploy triton` needs no
extra; the tests parse every file against tritonclient's model_config_pb2.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from partialnet.errors import UsageError
from partialnet.files import DIR_MODE, atomic_write_text

from .models import IMAGE_INPUT, ServedModel, served_model

MODEL_PY = '''"""Triton Python-backend model written by `deploy triton`: the partialnet-deploy runner on 1/export/."""
from deploy.serving.python_model import TritonPythonModel  # noqa: F401  (needs partialnet-deploy installed)
'''


@dataclass
class RepositoryRequest:
    folder: Path
    output: Path
    force: bool = False
    max_batch: int = 8
    max_queue_delay_us: int = 500
    instances: int = 1
    model_name: str | None = None
    backend: str | None = None  # the artifact the Python-backend models run (default: the reference ONNX's)
    precision: str | None = None


@dataclass
class RepositoryResult:
    output: Path
    models: list[dict] = field(default_factory=list)

    def summary(self) -> list[str]:
        lines = [f"{m['name']}: {m['runs']}" for m in self.models]
        return lines + [str(self.output)]


def _q(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal: double quotes, backslash escapes


def _tensor(name: str, dtype: str, dims) -> str:
    return f"  {{\n    name: {_q(name)}\n    data_type: {dtype}\n    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}"


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, the largest included: the batch sizes every backend here is fastest at."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= max_batch and b >= max(1, max_batch // 4)]
    return sorted(set(sizes + [max_batch]))


def config_pbtxt(name: str, *, model: ServedModel, max_batch: int, max_queue_delay_us: int, instances: int,
                 platform: str | None = None, backend: str | None = None, kind: str = "KIND_CPU",
                 default_model_filename: str | None = None, parameters: dict[str, str] | None = None,
                 image: bool = False) -> str:
    """One model's config.pbtxt: the artifact's input and output, dynamic batching, instance groups, parameters."""
    lines = [f"name: {_q(name)}"]
    lines.append(f"platform: {_q(platform)}" if platform else f"backend: {_q(backend)}")
    if default_model_filename:
        lines.append(f"default_model_filename: {_q(default_model_filename)}")
    if image:
        # One request at a time: a bad image fails only its own request, never a batch merged from others'.
        lines.append("max_batch_size: 0")
        lines.append("input [\n" + _tensor(IMAGE_INPUT, "TYPE_STRING", [-1]) + "\n]")
        lines.append("output [\n" + _tensor("logits", "TYPE_FP32", [-1, model.num_classes]) + "\n]")
    else:
        lines.append(f"max_batch_size: {max_batch}")
        lines.append("input [\n" + _tensor("input", "TYPE_FP32", model.input_dims) + "\n]")
        lines.append("output [\n" + _tensor("logits", "TYPE_FP32", [model.num_classes]) + "\n]")
        sizes = ", ".join(str(b) for b in preferred_batch_sizes(max_batch))
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
                     f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{\n  key: {_q(key)}\n  value: {{ string_value: {_q(value)} }}\n}}")
    return "\n".join(lines) + "\n"


def _native(art, model: ServedModel, req: RepositoryRequest) -> tuple[dict, dict[str, str]] | None:
    """(config keyword arguments, {file in 1/: file in the export}) for an artifact a Triton backend runs natively;
    what that backend is comes from the artifact's own backend module (deploy/backends)."""
    from deploy import backends

    if art.backend not in backends.BACKENDS:
        return None
    native = backends.BACKENDS[art.backend].triton_model(art)
    if native is None:
        return None
    kwargs = dict(model=model, max_queue_delay_us=req.max_queue_delay_us, instances=req.instances,
                  max_batch=min(req.max_batch, native.max_batch or req.max_batch), platform=native.platform,
                  backend=native.backend, kind=native.kind, default_model_filename=native.default_model_filename,
                  parameters=native.parameters or None)
    return kwargs, dict(native.files)


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def write_repository(req: RepositoryRequest, log: Callable[[str], None]) -> RepositoryResult:
    """Build the repository in a hidden folder beside --output and rename it into place."""
    from deploy import backends
    from export.manifest import Manifest
    from runtimes.artifacts import check_artifact

    manifest = Manifest.load(req.folder)
    model = served_model(manifest, req.model_name)
    served = manifest.find(req.backend or backends.reference_backend().name, req.precision)
    dest = Path(req.output)
    if dest.exists() and not req.force:
        raise UsageError(f"{dest} exists; pass --force to replace it, or choose another --output.")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a folder; choose another --output.")
    if dest.resolve() == Path(req.folder).resolve() or Path(req.folder).resolve() in dest.resolve().parents:
        raise UsageError(f"--output {dest} is inside the export folder; write the repository elsewhere.")
    for art in manifest.artifacts:
        for rel, sha in art.files:
            check_artifact(Path(req.folder) / rel, sha)

    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    os.chmod(stage, DIR_MODE)
    result = RepositoryResult(dest)
    try:
        for art in manifest.artifacts:
            native = _native(art, model, req)
            if native is None:
                continue
            kwargs, files = native
            name = f"{model.name}_{re.sub(r'[^A-Za-z0-9]+', '_', art.key)}"
            for inside, rel in files.items():
                _copy(Path(req.folder) / rel, stage / name / "1" / inside)
            atomic_write_text(stage / name / "config.pbtxt", config_pbtxt(name, **kwargs))
            result.models.append({"name": name, "runs": f"{art.key} ({art.path}), "
                                  f"{kwargs.get('platform') or kwargs.get('backend')} backend"})
        for name, image in ((model.name, False), (model.image_name, True)):
            _python_model(stage / name, name, served, manifest, req, model, image)
            result.models.append({"name": name, "runs": f"{served.key} ({served.path}) "
                                  f"through partialnet-deploy, python backend" + (", encoded images" if image else "")})
        atomic_write_text(stage / "README.md", _readme(result, req))
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(stage, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(f"wrote {len(result.models)} models to {dest}")
    return result


def _python_model(folder: Path, name: str, art, manifest, req: RepositoryRequest, model: ServedModel,
                  image: bool) -> None:
    """A Python-backend model: 1/model.py, 1/export/ (the artifact and a manifest listing only it), config.pbtxt."""
    from dataclasses import replace

    export = folder / "1" / "export"
    for rel, _ in art.files:
        _copy(Path(req.folder) / rel, export / rel)
    own = replace(manifest, artifacts=[art], skipped=[])
    export.mkdir(parents=True, exist_ok=True)
    own.save(export)
    atomic_write_text(folder / "1" / "model.py", MODEL_PY)
    params = {"export_dir": "export", "backend": art.backend, "precision": art.precision_spec,
              "kind": "image" if image else "tensor", "max_images": str(req.max_batch)}
    atomic_write_text(folder / "config.pbtxt", config_pbtxt(
        name, model=model, max_batch=req.max_batch, max_queue_delay_us=req.max_queue_delay_us,
        instances=req.instances, backend="python", parameters=params, image=image))


def _readme(result: RepositoryResult, req: RepositoryRequest) -> str:
    rows = "\n".join(f"- `{m['name']}`: {m['runs']}" for m in result.models)
    return f"""# Triton model repository written by `deploy triton {req.folder}`

{rows}

The Triton-native models (onnxruntime_onnx, openvino, tensorrt_plan) need NVIDIA's official Triton container, which has those backends
(PyTriton's bundled tritonserver has only the Python backend). The python-backend models run the artifact in
`1/export/` through partialnet-deploy, which must be installed in the Python environment of Triton's Python backend.

OpenVINO models: the backend has no f32 precision hint, so on CPUs with AMX (where OpenVINO defaults to bf16) the
fp32 and int8 models compute partly in bf16; an int8 IR exported with `--int8-cpu vnni` is only exact on CPUs with
VNNI or AMX, and Triton's backend does not check it as `deploy serve` does.
"""
