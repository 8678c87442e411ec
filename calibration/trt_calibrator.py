"""TensorRT's implicit-INT8 entropy calibrator over an ImageSet, with a keyed calibration cache.

Only for TensorRT versions that still ship the calibrator API (`trt.IInt8EntropyCalibrator2`, deprecated in
TensorRT 10); the default INT8 path is the explicit Q/DQ ONNX (calibration.qdq), which needs no calibrator.
TensorRT is imported through `runtimes.trt.require_tensorrt()`, so without a GPU this module raises
BackendUnavailable before touching TensorRT. Device buffers are torch CUDA tensors, as in the TensorRT runner.

The cache TensorRT writes is stored through `calibration.cache.KeyedCache`: keyed by the ONNX file's bytes, the
calibration set and the preprocessing, so a cache made for another model or other images is deleted, never read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from partialnet.errors import UsageError

from .cache import CacheKey, KeyedCache
from .sources import ImageSet


def entropy_calibrator(
    onnx_path: str | Path,
    calib: ImageSet,
    cache_path: str | Path,
    preprocess: Mapping[str, Any],
    *,
    batch_size: int = 8,
) -> Any:
    """A `trt.IInt8EntropyCalibrator2` feeding `calib` in batches, with its cache keyed to this model and data."""
    from runtimes.base import BackendUnavailable
    from runtimes.trt import require_tensorrt

    trt = require_tensorrt()
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} has no calibrator API (implicit INT8 was removed); build the int8 engine "
            f"from the explicit Q/DQ ONNX (tensorrt/model.qdq.onnx) instead."
        )
    if batch_size < 1:
        raise UsageError(f"calibration batch size must be at least 1, got {batch_size}.")
    if len(calib) == 0:
        raise UsageError(f"the calibration set ({calib.source}) is empty; give at least one image.")
    import torch

    cache = KeyedCache(cache_path, CacheKey.of(onnx_path, calib, preprocess, tool=f"tensorrt {trt.__version__}",
                                               calibrator="IInt8EntropyCalibrator2", batch_size=batch_size))

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cache = cache
            self.cache_status = cache.prepare()
            self._images = np.ascontiguousarray(calib.images, dtype=np.float32)
            self._next = 0
            self._device = torch.device("cuda", torch.cuda.current_device())
            shape = (batch_size, *self._images.shape[1:])
            self._buffer = torch.empty(shape, dtype=torch.float32, device=self._device)

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next >= len(self._images):
                return None
            chunk = self._images[self._next : self._next + batch_size]
            self._next += batch_size
            if len(chunk) < batch_size:  # TensorRT reads whole batches: repeat the last images to fill it
                chunk = np.concatenate([chunk, chunk[-1:].repeat(batch_size - len(chunk), axis=0)])
            self._buffer.copy_(torch.from_numpy(chunk))
            return [int(self._buffer.data_ptr())] * len(names)

        def read_calibration_cache(self) -> bytes | None:
            return self.cache.read_bytes()

        def write_calibration_cache(self, data: Any) -> None:
            self.cache.write_bytes(bytes(data))

    return _EntropyCalibrator()
