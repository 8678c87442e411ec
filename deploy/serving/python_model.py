"""The Python-backend models of a `deploy triton` repository: the project's runner inside Triton's Python backend.

Each model's `1/model.py` imports `TritonPythonModel` from here, so the Python environment Triton's Python backend
runs in needs partialnet-deploy installed (`pip install -e .` in that environment). The artifact and its manifest
are copied into the model's `1/export/` folder and opened through `deploy.backends.open_artifact`, sha256 checked,
exactly as `deploy serve` opens them. Unlike PyTriton, the Python backend can fail one request of a batch alone, so a
bad image here is a 400 for its own request only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .models import IMAGE_INPUT, decode_images, run_logits


class TritonPythonModel:
    """Triton's Python-backend interface: initialize once per instance, execute per batch of requests."""

    def initialize(self, args: dict) -> None:
        from deploy.backends import open_artifact
        from export.manifest import Manifest
        from partialnet.variants import Preprocess

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / str(args["model_version"]) / params.get("export_dir", "export")
        manifest = Manifest.load(folder)
        threads = int(params["threads"]) if params.get("threads") else None
        self.runner, self.artifact = open_artifact(folder, manifest, params["backend"], params["precision"], threads)
        self.kind = params.get("kind", "tensor")
        self.pp = Preprocess.from_dict(manifest.preprocess)
        self.max_images = int(params.get("max_images") or config.get("max_batch_size") or 8)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        from partialnet.errors import DeployError
        from runtimes.base import INPUT_NAME, OUTPUT_NAME

        def answer(logits):
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, logits)])

        def refuse(error: Exception):
            code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
            err = pb_utils.TritonError(str(error), code) if code is not None else pb_utils.TritonError(str(error))
            return pb_utils.InferenceResponse(output_tensors=[], error=err)

        if self.kind == "image":
            out = []
            for request in requests:
                try:
                    x = decode_images(pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT).as_numpy(), self.pp,
                                      self.max_images)
                    out.append(answer(run_logits(self.runner, x)))
                except DeployError as e:
                    out.append(refuse(e))
            return out
        # Tensor model: Triton has checked names, dtypes and shapes; the batcher's requests run as one batch.
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        logits = run_logits(self.runner, np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        out, start = [], 0
        for a in arrays:
            out.append(answer(np.ascontiguousarray(logits[start : start + len(a)])))
            start += len(a)
        return out

    def finalize(self) -> None:
        self.runner.close()
