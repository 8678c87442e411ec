"""The evaluation preprocessing contract (spec §7.3), written once with Pillow and NumPy.

Resize the shorter side to int(N / 0.9) with antialiased bicubic, center-crop N x N, scale to [0, 1],
normalize with the ImageNet mean and std. Output is float32 CHW (one image) or NCHW (a batch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ImageError
from .variants import Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Alpha is dropped as training's `convert('RGB')` did."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; any failure names the file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image {path} does not exist.")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image.")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except UnidentifiedImageError as e:
        raise ImageError(f"{path} is not an image Pillow can read (jpg, png, webp, bmp, ...).") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path} could not be decoded ({e}); the file may be truncated or corrupt.") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path} is too large to decode safely ({e}).") from e


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio (longer side truncated to int)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), _RESAMPLE[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:
        raise ImageError(f"cannot center-crop {size} px from a {w}x{h} image.")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess_image(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """One RGB image to a normalized float32 [3, N, N] array."""
    img = center_crop(resize_shorter(to_rgb(img), pp.resize_size, pp.interpolation), pp.input_size)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(pp.mean, dtype=np.float32)) / np.asarray(pp.std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def preprocess_files(paths: Sequence[str | Path], pp: Preprocess) -> np.ndarray:
    """Images on disk to one float32 NCHW batch."""
    return np.stack([preprocess_image(load_image(p), pp) for p in paths]) if paths else np.zeros(
        (0, 3, pp.input_size, pp.input_size), np.float32
    )


def iter_image_files(folder: str | Path) -> Iterable[Path]:
    """Image files under a folder, recursively, in sorted order."""
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            yield p


# Decoding a truncated file raises instead of silently returning a partly grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
