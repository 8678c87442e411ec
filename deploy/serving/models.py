"""What the served models look like, shared by `deploy serve`, `deploy triton` and `deploy loadtest`.

Two models per artifact: `<name>` takes the preprocessed tensor exactly as the artifact does (`input`, FP32
[-1, 3, N, N] -> `logits`, FP32 [-1, classes]); `<name>_image` takes encoded image bytes (`image`, BYTES [-1]) and
applies the manifest's preprocessing contract in the server, one request at a time, so that one undecodable image
fails only its own request and never a batch merged from other clients' requests.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from partialnet.errors import ImageError
from partialnet.variants import Preprocess
from runtimes.base import INPUT_NAME, OUTPUT_NAME

IMAGE_INPUT = "image"
IMAGE_SUFFIX = "_image"


@dataclass(frozen=True)
class ServedModel:
    """The names and shapes of the tensor model and the image model for one artifact."""

    name: str
    input_size: int
    num_classes: int

    @property
    def image_name(self) -> str:
        return self.name + IMAGE_SUFFIX

    @property
    def input_dims(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)


def served_model(manifest, model_name: str | None = None) -> ServedModel:
    """The served model of a manifest: named after its variant unless `model_name` says otherwise."""
    return ServedModel(model_name or manifest.variant, int(manifest.input_size), int(manifest.num_classes))


def decode_image(data: bytes, pp: Preprocess) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) to the normalized float32 [3, N, N] array of the preprocessing contract."""
    from PIL import Image, UnidentifiedImageError

    from partialnet.preprocess import preprocess_image

    if not data:
        raise ImageError("the image is empty (0 bytes); send the encoded file's bytes (JPEG, PNG, WebP, BMP).")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return preprocess_image(img, pp)
    except UnidentifiedImageError as e:
        raise ImageError(f"{len(data)} bytes are not an image Pillow can read (JPEG, PNG, WebP, BMP, ...).") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"the image is too large to decode safely ({e}).") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"the image could not be decoded ({e}); the file may be truncated or corrupt.") from e


def decode_images(items, pp: Preprocess, max_images: int) -> np.ndarray:
    """A request's BYTES tensor (one encoded image per element) to a float32 NCHW batch."""
    flat = list(np.asarray(items, dtype=object).reshape(-1))
    if not flat:
        raise ImageError(f"the request holds no image; send 1 to {max_images} encoded images in {IMAGE_INPUT!r}.")
    if len(flat) > max_images:
        raise ImageError(f"the request holds {len(flat)} images; at most {max_images} per request (--max-batch).")
    out = []
    for i, item in enumerate(flat):
        try:
            out.append(decode_image(bytes(item), pp))
        except ImageError as e:
            raise ImageError(f"image {i} of {len(flat)}: {e}") from e
    return np.stack(out).astype(np.float32, copy=False)


def run_logits(runner, x: np.ndarray) -> np.ndarray:
    """The runner's logits as a C-contiguous float32 array (Triton reads the buffer as laid out)."""
    return np.ascontiguousarray(runner.run({INPUT_NAME: x})[OUTPUT_NAME], dtype=np.float32)
